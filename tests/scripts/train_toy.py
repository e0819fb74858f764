"""Train the toy regression of tests/test_train.py, alone or under a launcher.

Usage: ``train_toy.py OUT BATCH_SIZE [MAX_STEPS | resume]``. 48 samples, so a global batch of 16 splits evenly
whatever the number of processes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toy problem lives in tests/test_train.py

from test_train import ToyData, config, toy_model  # noqa: E402

from fmrilm.train import Trainer  # noqa: E402

if __name__ == "__main__":
    out, batch_size, extra = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    max_steps = int(extra[0]) if extra and extra[0] != "resume" else None
    cfg = config(batch_size=batch_size, epochs=6, log_every=1, max_steps=max_steps)
    data = ToyData(n=48)

    def eval_fn(model):  # runs on the main process only; the Trainer shares its result with the others
        return {"probe_mse": model({"x": data.x[:10], "y": data.y[:10]})["mse_loss"]}

    final = Trainer(toy_model(), data, cfg, out, eval_fn=eval_fn).fit(resume=extra == ["resume"])
    assert max_steps is not None or "probe_mse" in final, final
