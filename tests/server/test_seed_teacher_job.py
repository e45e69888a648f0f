"""``seed_digits_job --data teacher``: the teacher workload as a real job the agents can train."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from downpour.teacher import TEACHER_INPUTS, TEACHER_TEST_SIZE, TEACHER_TRAIN_SIZE
from downpour.training.models import Job

# Generating, uploading and sharding 500k samples takes about a minute on the 2-core machine.
pytestmark = [pytest.mark.django_db, pytest.mark.slow]


def test_it_seeds_a_student_mlp_job_on_the_500k_teacher_set() -> None:
    out = io.StringIO()
    call_command("seed_digits_job", "--data", "teacher", "--data-shards", "4", stdout=out)
    job = Job.objects.get(id=json.loads(out.getvalue().strip().splitlines()[-1])["job_id"])
    dataset = job.dataset
    assert (dataset.n_train, dataset.n_test) == (TEACHER_TRAIN_SIZE, TEACHER_TEST_SIZE)
    assert dataset.input_shape == [TEACHER_INPUTS] and dataset.n_classes == 10
    assert dataset.shards.count() == 4
    assert job.param_count == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    config = job.model_config["config"]
    layers = config["layers"]
    dense = [layer["config"]["units"] for layer in layers if layer["class_name"] == "Dense"]
    assert dense == [64, 64, 10]


def test_it_refuses_the_teacher_set_for_the_image_cnn() -> None:
    with pytest.raises(CommandError, match="not the CNN"):
        call_command("seed_digits_job", "--data", "teacher", "--model", "cnn-bn")
