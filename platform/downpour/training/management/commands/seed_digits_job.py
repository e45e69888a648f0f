"""Create the digits demo: a researcher, a donor with a token, the data set and a job.

Prints one JSON line with the ids and the token, for the demo, tests and benchmarks.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand, CommandParser

from downpour.accounts.models import User
from downpour.digits import cnn_bn_json, digits_npz_bytes, mlp_json
from downpour.donors.models import AgentToken
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, submit_job


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hidden", default="128,128", help="hidden layer widths")
        parser.add_argument(
            "--model",
            choices=("mlp", "cnn-bn"),
            default="mlp",
            help="an MLP on flat digits, or a Conv-BatchNorm CNN on 8x8x1 images",
        )
        parser.add_argument("--learning-rate", type=float, default=0.05)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--n-fetch", type=int, default=1)
        parser.add_argument("--n-push", type=int, default=1)
        parser.add_argument("--param-shards", type=int, default=2)
        parser.add_argument("--data-shards", type=int, default=3)
        parser.add_argument("--max-staleness", type=int, default=16)
        parser.add_argument("--target-accuracy", type=float, default=0.95)
        parser.add_argument("--budget-seconds", type=float, default=None)
        parser.add_argument("--tokens", type=int, default=1)
        parser.add_argument(
            "--robust", action="store_true", help="centred clipping (the form's default)"
        )
        parser.add_argument("--name", default="digits-mlp")
        parser.add_argument("--spot-check-fraction", type=float, default=0.05)

    def handle(self, *args: Any, **opts: Any) -> None:
        researcher, _ = User.objects.get_or_create(
            username="demo-researcher", defaults={"is_researcher": True}
        )
        donor, _ = User.objects.get_or_create(username="demo-donor", defaults={"is_donor": True})
        tokens = [AgentToken.issue(donor, f"demo-{i}")[1] for i in range(opts["tokens"])]
        cnn = opts["model"] == "cnn-bn"
        upload = SimpleUploadedFile("digits.npz", digits_npz_bytes(images=cnn))
        dataset = create_dataset(researcher, "digits", upload, opts["data_shards"])
        hidden = [int(h) for h in opts["hidden"].split(",") if h]
        job = submit_job(
            researcher,
            dataset,
            JobParams(
                name=opts["name"],
                model_json=cnn_bn_json() if cnn else mlp_json(hidden),
                learning_rate=opts["learning_rate"],
                batch_size=opts["batch_size"],
                n_fetch=opts["n_fetch"],
                n_push=opts["n_push"],
                n_param_shards=opts["param_shards"],
                max_staleness=opts["max_staleness"],
                target_accuracy=opts["target_accuracy"],
                budget_seconds=opts["budget_seconds"],
                robust_aggregation=opts["robust"],
                spot_check_fraction=opts["spot_check_fraction"],
            ),
        )
        self.stdout.write(
            json.dumps(
                {
                    "job_id": str(job.id),
                    "dataset_id": str(dataset.id),
                    "token": tokens[0],
                    "tokens": tokens,
                }
            )
        )
