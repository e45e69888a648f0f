"""Every ``keras.applications`` model, as Keras's own ``to_json()`` writes it, is accepted.

Each is accepted by ``check_model``, by job submission and by the agent's builder, or
is listed below with the one limit that refuses it. Keras builds each model once
(``weights=None``, nothing downloaded); the tests share its JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import call_command

from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobRejected, submit_job
from downpour_agent.modelspec import Limits, ModelRejected, validate_model_config

from .helpers import job_params, npz_upload

keras = pytest.importorskip("keras")

pytestmark = pytest.mark.slow

APPLICATIONS = sorted(name for name in dir(keras.applications) if name[:1].isupper())

#: Built by default with a variable input, ``(None, None, 3)``. Downpour models take a
#: fixed input shape: the dataset's, and the one compute is counted for. These are
#: checked as Keras builds them at their documented size instead.
FIXED_INPUT = {"MobileNetV3Large": (224, 224, 3), "MobileNetV3Small": (224, 224, 3)}

#: Above the default bound of 5e9 multiply-adds per sample at their native input size.
#: That bound stays: the server recomputes spot-checked batches with this model. Each is
#: refused for that bound alone, and accepted once the limits allow its size.
OVER_COMPUTE_LIMIT = frozenset(
    {
        "ConvNeXtBase",
        "ConvNeXtLarge",
        "ConvNeXtSmall",
        "ConvNeXtXLarge",
        "EfficientNetB5",
        "EfficientNetB6",
        "EfficientNetB7",
        "EfficientNetV2L",
        "EfficientNetV2M",
        "EfficientNetV2S",
        "InceptionResNetV2",
        "InceptionV3",
        "NASNetLarge",
        "ResNet101",
        "ResNet101V2",
        "ResNet152",
        "ResNet152V2",
        "VGG16",
        "VGG19",
        "Xception",
    }
)
#: Large enough for ConvNeXtXLarge (350M parameters, 61e9 multiply-adds).
ROOMY = Limits(max_params=400_000_000, max_flops_per_sample=100_000_000_000)

_built: dict[str, tuple[str, int, tuple[int, ...]]] = {}


def application(name: str) -> tuple[str, int, tuple[int, ...]]:
    """``(to_json(), count_params(), input shape)`` of one application, built once."""
    if name not in _built:
        shape = FIXED_INPUT.get(name)
        kwargs = {"input_shape": shape} if shape else {}
        model = getattr(keras.applications, name)(weights=None, **kwargs)
        _built[name] = (model.to_json(), model.count_params(), tuple(model.input_shape[1:]))
        del model
        keras.backend.clear_session()
    return _built[name]


def limits_for(name: str) -> Limits:
    return ROOMY if name in OVER_COMPUTE_LIMIT else Limits()


def run_check_model(tmp_path: Path, text: str) -> tuple[int, str, str]:
    path = tmp_path / "model.json"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("check_model", str(path), stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_the_list_names_only_applications_keras_has() -> None:
    assert set(FIXED_INPUT) | OVER_COMPUTE_LIMIT <= set(APPLICATIONS)
    assert len(APPLICATIONS) >= 40


@pytest.mark.parametrize("name", sorted(FIXED_INPUT))
def test_a_variable_input_size_is_refused_for_its_input_alone(name: str) -> None:
    # Prepare
    model = getattr(keras.applications, name)(weights=None)
    text = model.to_json()
    del model
    keras.backend.clear_session()

    # Execute
    with pytest.raises(ModelRejected) as info:
        validate_model_config(text)

    # Assert
    assert info.value.path == "config.layers[0].config.batch_shape[1]"
    assert "input dimensions must be fixed integers" in info.value.message


@pytest.mark.parametrize("name", APPLICATIONS)
def test_check_model_accepts_it_or_names_the_compute_limit(name: str, tmp_path: Path) -> None:
    # Prepare
    text, params, _ = application(name)

    # Execute
    code, out, err = run_check_model(tmp_path, text)

    # Assert
    if name in OVER_COMPUTE_LIMIT:
        assert code == 1
        assert "multiply-adds per sample, above the limit of 5,000,000,000" in err
        assert validate_model_config(text, limits=ROOMY).param_count == params
    else:
        assert code == 0, err
        assert "accepted" in out and f"Total params: {params:,}" in out


@pytest.mark.django_db
@pytest.mark.parametrize("name", APPLICATIONS)
def test_job_submission_accepts_it_or_names_the_compute_limit(name: str, alice: Any) -> None:
    # Prepare: two samples of the model's input shape, labels for its 1000 classes
    text, params, shape = application(name)
    rng = np.random.default_rng(0)
    dataset = create_dataset(
        alice,
        name,
        npz_upload(
            x_train=rng.random((2, *shape), dtype=np.float32),
            y_train=np.array([0, 999]),
            x_test=rng.random((1, *shape), dtype=np.float32),
            y_test=np.array([1]),
        ),
        n_shards=1,
    )

    # Execute
    try:
        job = submit_job(alice, dataset, job_params(name=name, model_json=text))
    except JobRejected as exc:
        refusal = str(exc)
    else:
        refusal = ""

    # Assert
    if name in OVER_COMPUTE_LIMIT:
        assert "multiply-adds per sample, above the limit of 5,000,000,000" in refusal
    else:
        assert refusal == ""
        assert job.param_count == params
        assert validate_model_config(job.model_config).param_count == params


@pytest.mark.parametrize("name", APPLICATIONS)
def test_the_agent_builds_it_with_keras_parameter_count(name: str) -> None:
    from downpour_agent.modelspec import build_model

    # Prepare
    text, params, shape = application(name)
    limits = limits_for(name)

    # Execute
    spec = validate_model_config(text, limits=limits)
    model = build_model(spec, limits=limits)
    built = model.count_params()
    built_shape = tuple(model.input_shape[1:])
    rebuilt_config = json.loads(model.to_json())
    del model
    keras.backend.clear_session()

    # Assert
    assert spec.param_count == params
    assert built == params
    assert built_shape == shape == spec.input_shape
    assert validate_model_config(rebuilt_config, limits=limits).param_count == params


@pytest.mark.parametrize(
    "name",
    # Between them: operations with tensors and with numbers, nested Sequential,
    # LayerScale, Normalization, LayerNormalization, Cropping2D, broadcast Multiply.
    ["ConvNeXtTiny", "EfficientNetB0", "MobileNetV3Small", "NASNetMobile"],
)
def test_the_agent_builds_a_model_that_computes_what_keras_does(name: str) -> None:
    from downpour_agent.modelspec import build_model

    # Prepare
    shape = FIXED_INPUT.get(name)
    original = getattr(keras.applications, name)(
        weights=None, **({"input_shape": shape} if shape else {})
    )
    rebuilt = build_model(original.to_json())
    rebuilt.set_weights(original.get_weights())
    x = np.random.default_rng(0).random((1, *original.input_shape[1:]), dtype=np.float32) * 255

    # Execute
    expected, got = np.asarray(original(x)), np.asarray(rebuilt(x))
    keras.backend.clear_session()

    # Assert
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
