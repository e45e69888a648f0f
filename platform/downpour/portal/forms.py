from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib.auth.forms import UserCreationForm
from django.forms import BoundField

from downpour.accounts.models import User
from downpour.paramstore import DEFAULT_MAX_GRAD_NORM
from downpour.training.models import Dataset


class SignupForm(UserCreationForm):  # type: ignore[type-arg]
    is_researcher = forms.BooleanField(required=False, initial=True, label="I am a researcher")
    is_donor = forms.BooleanField(required=False, label="I donate compute")

    class Meta:
        model = User
        fields = ("username", "email", "is_researcher", "is_donor")


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=100)
    file = forms.FileField(help_text=".npz with x_train, y_train, x_test, y_test")
    # bench/: with several data shards one agent spends a whole work unit on a slice of the
    # training set and levels off lower; one shard samples all of it (docs/benchmarks.md).
    n_shards = forms.IntegerField(
        min_value=1,
        max_value=256,
        initial=1,
        label="Data shards",
        help_text="how many pieces agents download the training set in. One is best for a "
        "small data set; split a large one so each agent downloads only a piece",
    )


@dataclass(frozen=True)
class FieldGroup:
    """Fields shown together on the job form; ``advanced`` groups start folded."""

    legend: str
    fields: list[BoundField]
    advanced: bool

    @property
    def has_errors(self) -> bool:
        return any(f.errors for f in self.fields)


class JobForm(forms.Form):
    """The job form. Defaults are the settings ``bench/`` measured best on the digits MLPs
    (docs/benchmarks.md): batch 32, Adagrad 0.05, n_fetch = n_push = 4, 2 parameter
    shards, staleness bound 16."""

    GROUPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
        ("The job", ("name", "dataset", "model_json", "model_file", "loss"), False),
        ("When to stop", ("target_accuracy", "budget_samples", "budget_seconds"), False),
        ("Optimiser", ("learning_rate", "batch_size"), True),
        (
            "Communication between agents and the server",
            ("n_fetch", "n_push", "n_param_shards", "max_staleness", "staleness_aware_lr"),
            True,
        ),
        ("Starting point", ("warm_start_pushes", "initial_weights"), True),
        (
            "Protection against faulty volunteers",
            ("robust_aggregation", "max_grad_norm", "spot_check_fraction"),
            True,
        ),
    )

    name = forms.CharField(max_length=100, help_text="for you: it names the downloads too")
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), help_text="one of the data sets you uploaded"
    )
    model_json = forms.CharField(
        label="Model",
        widget=forms.Textarea(attrs={"rows": 8}),
        required=False,
        help_text="a Keras model as JSON: the output of model.to_json()",
    )
    model_file = forms.FileField(
        label="…or the model as a file", required=False, help_text="the same JSON, uploaded"
    )
    loss = forms.ChoiceField(
        choices=[
            (c, c)
            for c in (
                "sparse_categorical_crossentropy",
                "categorical_crossentropy",
                "binary_crossentropy",
                "mean_squared_error",
            )
        ],
        help_text="sparse categorical cross-entropy for integer class labels",
    )
    target_accuracy = forms.FloatField(
        label="Target test accuracy",
        required=False,
        min_value=0.0001,
        max_value=1,
        help_text="a fraction, e.g. 0.95: the job stops once the test set scores this",
    )
    budget_samples = forms.IntegerField(
        label="Budget in samples",
        required=False,
        min_value=1,
        help_text="stop after training on this many samples in all (empty: no limit)",
    )
    budget_seconds = forms.FloatField(
        label="Budget in seconds",
        required=False,
        min_value=1,
        help_text="stop after this long (empty: no limit)",
    )
    learning_rate = forms.FloatField(
        label="Learning rate",
        initial=0.05,
        min_value=1e-8,
        max_value=10,
        help_text="Adagrad's step size, applied by the server to every push",
    )
    batch_size = forms.IntegerField(
        initial=32,
        min_value=1,
        max_value=65536,
        help_text="samples per gradient step on an agent",
    )
    n_fetch = forms.IntegerField(
        label="Steps between fetches (n_fetch)",
        initial=4,
        min_value=1,
        help_text="an agent downloads fresh weights every this many steps. Higher is faster "
        "for a large model, since each fetch moves the whole model; 4 trained as well as 1 "
        "at about three times the speed in our benchmarks",
    )
    n_push = forms.IntegerField(
        label="Steps between pushes (n_push)",
        initial=4,
        min_value=1,
        help_text="an agent sends its summed gradients every this many steps. Higher means "
        "fewer, larger messages but updates that other agents see later",
    )
    n_param_shards = forms.IntegerField(
        label="Parameter shards",
        initial=2,
        min_value=1,
        max_value=64,
        help_text="the weights are split into this many pieces that are updated "
        "independently, so pushes to different pieces do not wait for each other",
    )
    max_staleness = forms.IntegerField(
        label="Most staleness accepted",
        initial=16,
        min_value=0,
        help_text="a push computed on weights this many updates old, or older, is refused "
        "rather than applied, so slow agents cannot drag the model back",
    )
    staleness_aware_lr = forms.BooleanField(
        label="Smaller steps for stale pushes",
        required=False,
        help_text="divide each push's step by its staleness (Zhang et al. 2016)",
    )
    warm_start_pushes = forms.IntegerField(
        label="Warm start (pushes)",
        initial=0,
        min_value=0,
        help_text="let one agent train alone for this many pushes before others join, so "
        "the model leaves its random start before many agents push at once (0: off)",
    )
    initial_weights = forms.FileField(
        required=False,
        help_text="optional .npz to start from, e.g. a finished job's weights.npz: one float32 "
        "array per variable, named as in that download",
    )
    robust_aggregation = forms.BooleanField(
        required=False,
        initial=True,
        help_text="centred clipping against faulty or malicious volunteers. The job first "
        "warms up on a trusted agent (a machine the operators vouch for): until its first "
        "pushes have set the clipping centre, other agents get no work from this job",
    )
    max_grad_norm = forms.FloatField(
        label="Largest gradient norm",
        required=False,
        initial=DEFAULT_MAX_GRAD_NORM,
        min_value=0,
        help_text="each push is scaled down to this size (its L2 norm) before it is applied, "
        "so one broken or hostile push cannot wreck the model (0: no limit)",
    )
    spot_check_fraction = forms.FloatField(
        initial=0.05,
        min_value=0,
        max_value=1,
        required=False,
        help_text="fraction of work units a trusted worker recomputes to catch faked "
        "gradients; 0.05 catches an always-faking agent within 100 units with p ≥ 0.99",
    )

    def groups(self) -> list[FieldGroup]:
        return [
            FieldGroup(legend, [self[n] for n in names], adv) for legend, names, adv in self.GROUPS
        ]

    def __init__(self, owner: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = Dataset.objects.filter(owner=owner)  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        upload = data.get("model_file")
        if upload:
            if upload.size > 1 << 20:
                raise forms.ValidationError("the model JSON is larger than 1 MiB")
            try:
                data["model_json"] = upload.read().decode("utf-8")
            except UnicodeDecodeError:
                raise forms.ValidationError("the model file is not UTF-8 JSON") from None
        if not data.get("model_json"):
            raise forms.ValidationError("paste the model JSON or upload it")
        return data
