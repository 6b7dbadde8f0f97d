"""Run under torchrun by test_distributed.py: write the training items this rank gets.

    torchrun --nproc_per_node 2 tests/ddp_probe.py OUT.json <train.py arguments>
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import distributed  # noqa: E402
import loader  # noqa: E402
import options  # noqa: E402

out, argv = Path(sys.argv[1]), sys.argv[2:]
args = options.get_args_parser().parse_args(argv)
rank, world_size = distributed.setup(distributed.local_device(args.device))
settings = options.training_settings(args)
_, train_set, _ = data.build_datasets(settings.data, Path(args.out_dir))
items = {epoch: [item for batch in loader.epoch_batches(train_set, settings.loader, epoch) for item in batch]
         for epoch in (0, 1)}
out.with_suffix(f".rank{rank}.json").write_text(json.dumps({"world_size": world_size, "items": items}))
distributed.shutdown()
