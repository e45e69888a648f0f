"""Create the digits demo: a researcher, a donor with a token, the data set and a job.

Prints one JSON line with the ids and the token, for the demo, tests and benchmarks.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand, CommandError, CommandParser

from downpour.accounts.models import User
from downpour.digits import cnn_bn_json, digits_npz_bytes, mlp_json
from downpour.donors.models import AgentToken
from downpour.teacher import STUDENT_HIDDEN, TEACHER_INPUTS, teacher_npz_bytes
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, submit_job


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hidden", default=None, help="hidden layer widths (128,128)")
        parser.add_argument(
            "--model",
            choices=("mlp", "cnn-bn"),
            default="mlp",
            help="an MLP on flat digits, or a Conv-BatchNorm CNN on 8x8x1 images",
        )
        parser.add_argument(
            "--data",
            choices=("digits", "teacher"),
            default="digits",
            help="the digits set, or 500k teacher-labelled samples (downpour.teacher) for "
            "an MLP with the student's hidden widths unless --hidden is given",
        )
        parser.add_argument("--learning-rate", type=float, default=0.05)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--n-fetch", type=int, default=1)
        parser.add_argument("--n-push", type=int, default=1)
        parser.add_argument("--param-shards", type=int, default=2)
        parser.add_argument("--data-shards", type=int, default=3)
        parser.add_argument("--max-staleness", type=int, default=64)
        parser.add_argument(
            "--weight-average", type=float, default=0.0, help="Downpour only; 0: off (0)"
        )
        parser.add_argument("--target-accuracy", type=float, default=0.95)
        parser.add_argument("--budget-seconds", type=float, default=None)
        parser.add_argument("--budget-samples", type=int, default=None)
        parser.add_argument("--compression", choices=["none", "int8"], default="none")
        parser.add_argument("--tokens", type=int, default=1)
        parser.add_argument(
            "--robust", action="store_true", help="centred clipping (the form's default)"
        )
        parser.add_argument("--name", default="digits-mlp")
        parser.add_argument("--sync-workers", type=int, default=2, help="N, synchronous only")
        parser.add_argument("--sync-backups", type=int, default=1, help="b, synchronous only")
        parser.add_argument("--sync-step-timeout", type=float, default=10.0, help="seconds")
        parser.add_argument("--spot-check-fraction", type=float, default=0.05)
        parser.add_argument(
            "--algorithm",
            choices=("downpour", "local-steps", "sync", "sandblaster"),
            default="downpour",
        )
        parser.add_argument("--lbfgs-history", type=int, default=10, help="Sandblaster only")
        parser.add_argument(
            "--sandblaster-units", type=int, default=24, help="units per pass, Sandblaster only"
        )
        parser.add_argument(
            "--inner-steps", type=int, default=0, help="local steps' H (0: per agent)"
        )
        parser.add_argument("--inner-optimizer", choices=("adamw", "sgd-momentum"), default="adamw")
        parser.add_argument("--inner-learning-rate", type=float, default=0.001)
        parser.add_argument("--outer-learning-rate", type=float, default=1.0)
        parser.add_argument("--outer-momentum", type=float, default=0.0)

    def handle(self, *args: Any, **opts: Any) -> None:
        researcher, _ = User.objects.get_or_create(
            username="demo-researcher", defaults={"is_researcher": True}
        )
        donor, _ = User.objects.get_or_create(username="demo-donor", defaults={"is_donor": True})
        tokens = [AgentToken.issue(donor, f"demo-{i}")[1] for i in range(opts["tokens"])]
        cnn = opts["model"] == "cnn-bn"
        teacher = opts["data"] == "teacher"
        if teacher and cnn:
            raise CommandError("--data teacher trains an MLP (flat inputs), not the CNN")
        if teacher:
            upload = SimpleUploadedFile("teacher.npz", teacher_npz_bytes())
            default_hidden, inputs = ",".join(map(str, STUDENT_HIDDEN)), TEACHER_INPUTS
        else:
            upload = SimpleUploadedFile("digits.npz", digits_npz_bytes(images=cnn))
            default_hidden, inputs = "128,128", 64
        dataset = create_dataset(researcher, opts["data"], upload, opts["data_shards"])
        hidden = [int(h) for h in (opts["hidden"] or default_hidden).split(",") if h]
        job = submit_job(
            researcher,
            dataset,
            JobParams(
                name=opts["name"],
                model_json=cnn_bn_json() if cnn else mlp_json(hidden, inputs=inputs),
                learning_rate=opts["learning_rate"],
                batch_size=opts["batch_size"],
                n_fetch=opts["n_fetch"],
                n_push=opts["n_push"],
                n_param_shards=opts["param_shards"],
                max_staleness=opts["max_staleness"],
                weight_average=opts["weight_average"],
                target_accuracy=opts["target_accuracy"],
                budget_seconds=opts["budget_seconds"],
                budget_samples=opts["budget_samples"],
                compression=opts["compression"],
                robust_aggregation=opts["robust"],
                spot_check_fraction=opts["spot_check_fraction"],
                algorithm=opts["algorithm"],
                inner_steps=opts["inner_steps"],
                inner_optimizer=opts["inner_optimizer"],
                inner_learning_rate=opts["inner_learning_rate"],
                outer_learning_rate=opts["outer_learning_rate"],
                outer_momentum=opts["outer_momentum"],
                sync_workers=opts["sync_workers"],
                sync_backups=opts["sync_backups"],
                sync_step_timeout_s=opts["sync_step_timeout"],
                lbfgs_history=opts["lbfgs_history"],
                sandblaster_units=opts["sandblaster_units"],
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
