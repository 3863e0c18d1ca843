import torch

import fastdiag

torch.manual_seed(0)
layer = torch.nn.MultiheadAttention(embed_dim=32, num_heads=4, batch_first=True)
router = torch.nn.Linear(32, 8)                        # routes 16 tokens to 8 sets
opt = torch.optim.AdamW([*layer.parameters(), *router.parameters()], lr=1e-3)
base_diag, set_diag = fastdiag.BaselineAttentionDiagnostics(), fastdiag.SetDiagnostics()

for _ in range(20):
    x = torch.randn(4, 16, 32)
    out, attn = layer(x, x, x, need_weights=True, average_attn_weights=False)  # [B, H, N, N]
    probs = router(out).softmax(-1)                                           # [B, N, S]
    loss = out.pow(2).mean() - probs.max(-1).values.mean()
    loss.backward()                       # gradients exist: update() reads them, before step()
    base_diag.update(attn.detach(), attention_params=dict(layer.named_parameters()))
    set_diag.update_with_router_state(probs.argmax(-1), 8, router_probs=probs.detach(),
                                      router_params=dict(router.named_parameters()))
    opt.step()
    opt.zero_grad()

stats = base_diag.get_epoch_stats() | set_diag.get_epoch_stats()   # one host copy each
print(f"attention entropy {stats['baseline/attention_entropy_mean']:.3f}, "
      f"router confidence {stats['ausa/router_confidence_mean']:.3f}")
for v in fastdiag.verdicts(stats):
    print(f"{v.key} = {v.value:.3g}: {v.failure}")
