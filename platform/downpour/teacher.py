"""The teacher workload: labels from a fixed random network on generated inputs.

The digits set (1,437 images) is too small to feed many donors: 64 donors with one shard
each would see 22 images apiece. Here the data are as plentiful as we like and exactly
reproducible: inputs ``x ~ N(0, I)`` of ``TEACHER_INPUTS`` dimensions and labels
``argmax(teacher(x))`` of a fixed random ``inputs-hidden-classes`` tanh network. A student
MLP (``digits.mlp_json(..., inputs=TEACHER_INPUTS)``) learns the teacher's decision regions.
Numpy only, so the simulator, the demo and the benchmarks import it without TensorFlow.

Algorithm (a second implementation reproduces the arrays bit for bit with numpy's PCG64)::

    rng = numpy.random.default_rng(seed)
    w1 = rng.standard_normal((inputs, hidden)) * 0.5 / sqrt(inputs)     # float64
    w2 = rng.standard_normal((hidden, classes)) / sqrt(hidden)
    train: x = rng.standard_normal((n_train, inputs)); then test x likewise (n_test rows)
    y = argmax(tanh(x @ w1) @ w2, axis=1); x is stored as float32, y as int64
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

TEACHER_INPUTS = 32
TEACHER_HIDDEN = 32
TEACHER_CLASSES = 10
TEACHER_TRAIN_SIZE = 500_000
TEACHER_TEST_SIZE = 10_000
TEACHER_SEED = 0
#: Student: 32-64-64-10 ReLU MLP (6,858 parameters, 27 kB as float32).
STUDENT_HIDDEN = (64, 64)


@dataclass(frozen=True)
class TeacherData:
    """Train and test sets: x float32 ``(n, inputs)``, y int64 ``(n,)`` in ``[0, classes)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def teacher_data(
    n_train: int = TEACHER_TRAIN_SIZE,
    n_test: int = TEACHER_TEST_SIZE,
    *,
    inputs: int = TEACHER_INPUTS,
    hidden: int = TEACHER_HIDDEN,
    classes: int = TEACHER_CLASSES,
    seed: int = TEACHER_SEED,
) -> TeacherData:
    """Generate the data set (deterministic for the arguments; about 0.5 s for 500k rows)."""
    if min(n_train, n_test, inputs, hidden) < 1 or classes < 2:
        raise ValueError("sizes must be positive and classes at least 2")
    rng = np.random.default_rng(seed)
    # tanh's inputs have standard deviation 0.5: mildly non-linear decision regions, which
    # the student learns to 0.90 in about 5,000 steps of batch 32 and keeps improving on.
    w1 = rng.standard_normal((inputs, hidden)) * 0.5 / math.sqrt(inputs)
    w2 = rng.standard_normal((hidden, classes)) / math.sqrt(hidden)
    x_train = rng.standard_normal((n_train, inputs))
    x_test = rng.standard_normal((n_test, inputs))

    def label(x: np.ndarray) -> np.ndarray:
        return np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int64)

    return TeacherData(
        x_train.astype(np.float32), label(x_train), x_test.astype(np.float32), label(x_test)
    )


def teacher_npz_bytes(n_train: int = TEACHER_TRAIN_SIZE, n_test: int = TEACHER_TEST_SIZE) -> bytes:
    """The data set as a job upload (``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    data = teacher_data(n_train, n_test)
    buf = io.BytesIO()
    np.savez(
        buf, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    return buf.getvalue()
