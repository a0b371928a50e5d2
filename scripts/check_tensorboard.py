"""Read xrayglm's TensorBoard event files with TensorBoard's own EventAccumulator.

Run:  $(bash scripts/fixtures_venv.sh) -m pip install tensorboard
      $(bash scripts/fixtures_venv.sh) scripts/check_tensorboard.py checkpoints/demo/tb
Prints every scalar tag with its step count and last value; exits 1 when nothing is read.
"""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
for tag in tags:
    events = acc.Scalars(tag)
    print("%-24s %4d steps, last step %d value %.6g" % (tag, len(events), events[-1].step, events[-1].value))
sys.exit(0 if tags else 1)
