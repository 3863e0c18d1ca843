import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastdiag

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)                        # sdpa attention, the default
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
log = fastdiag.MetricsLogger("runs/quickstart.db", config={"lr": 1e-3})

with fastdiag.watch(model, optimizer=opt, every=2) as w:  # hooks only: no host sync per step
    for epoch in range(3):
        for step in range(10):
            ids = torch.randint(0, 128, (8, 32))
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()                                 # gradient health is read at the step
            opt.zero_grad()
            log.log({"train/loss": loss.detach()}, step=epoch * 10 + step)
        log.log(w.get_epoch_stats(), step=epoch * 10 + 9)   # one host copy per epoch
        w.reset()
log.close()
# then: fastdiag report runs/quickstart.db
