from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib.auth.forms import UserCreationForm
from django.forms import BoundField

from downpour.accounts.models import User
from downpour.paramstore import DEFAULT_MAX_GRAD_NORM
from downpour.training.actions.jobs import MAX_WEIGHT_AVERAGE
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
    shards; the staleness bound 64 from the convergence simulator's sweep."""

    GROUPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
        ("The job", ("name", "dataset", "model_json", "model_file", "loss"), False),
        ("When to stop", ("target_accuracy", "budget_samples", "budget_seconds"), False),
        (
            "How agents train together",
            (
                "algorithm",
                "sync_workers",
                "sync_backups",
                "sync_step_timeout_s",
                "lbfgs_history",
                "sandblaster_units",
            ),
            False,
        ),
        ("Optimiser", ("learning_rate", "batch_size", "weight_average"), True),
        (
            "Local steps",
            (
                "inner_steps",
                "inner_optimizer",
                "inner_learning_rate",
                "outer_learning_rate",
                "outer_momentum",
            ),
            True,
        ),
        (
            "Communication between agents and the server",
            (
                "compression",
                "n_fetch",
                "n_push",
                "n_param_shards",
                "max_staleness",
                "staleness_aware_lr",
            ),
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
        queryset=Dataset.objects.none(),
        help_text="one of the data sets you uploaded",
        # A clone's dataset may have been deleted since the form was filled in.
        error_messages={
            # Said alike for a deleted dataset and another user's: nothing leaks either way.
            "invalid_choice": "that dataset is not one of yours (it was deleted, or never "
            "was): choose another or upload it again"
        },
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
    algorithm = forms.ChoiceField(
        label="Training mode",
        initial="downpour",
        required=False,
        choices=[
            (
                "downpour",
                "Downpour (asynchronous): every agent's gradient is applied as soon as it "
                "arrives; fastest, but agents compute on slightly old weights",
            ),
            ("local-steps", "Local steps: train alone for a while, then send the change"),
            (
                "sync",
                "Synchronous with backup agents: each step waits for the first N agents' "
                "gradients on the same weights and applies their average once",
            ),
            (
                "sandblaster",
                "Sandblaster L-BFGS: the server measures the loss and gradient over all the "
                "data, split into many small pieces among the agents, then takes a careful "
                "L-BFGS step",
            ),
        ],
        help_text="Downpour suits most jobs on fast links. With local steps each agent trains "
        "on its own for many steps (H) with its own optimizer and then sends how far its "
        "weights moved; the server combines those moves with momentum (DiLoCo): far fewer "
        "messages, so it suits donors on home links. Synchronous steps are what a single "
        "machine with a batch N times larger would do; backup agents keep a slow or lost "
        "agent from holding a step up. Sandblaster (L-BFGS) suits small models and "
        "datasets: each step uses all the data, fast agents take more pieces, and a slow "
        "agent's last piece is also given to an idle one",
    )
    sync_workers = forms.IntegerField(
        label="Agents per step (N, synchronous only)",
        required=False,
        initial=2,
        min_value=1,
        max_value=64,
        help_text="each step averages the gradients of the first N agents to finish it",
    )
    sync_backups = forms.IntegerField(
        label="Backup agents (synchronous only)",
        required=False,
        initial=1,
        min_value=0,
        max_value=64,
        help_text="this many agents more than N work on each step; the slowest gradients are "
        "dropped (their donors are still credited)",
    )
    sync_step_timeout_s = forms.FloatField(
        label="Longest wait for a step, seconds (synchronous only)",
        required=False,
        initial=10.0,
        min_value=0.1,
        max_value=600,
        help_text="if N gradients have not arrived this long after a step's first one, the "
        "step applies the average of those that did",
    )
    lbfgs_history = forms.IntegerField(
        label="L-BFGS memory (Sandblaster only)",
        required=False,
        initial=10,
        min_value=1,
        max_value=100,
        help_text="how many past steps shape the next step's direction",
    )
    sandblaster_units = forms.IntegerField(
        label="Pieces per pass (Sandblaster only)",
        required=False,
        initial=24,
        min_value=1,
        max_value=10_000,
        help_text="each pass over the data is cut into this many pieces; use many more than "
        "you expect agents",
    )
    learning_rate = forms.FloatField(
        label="Learning rate",
        initial=0.05,
        min_value=1e-8,
        max_value=10,
        help_text="Adagrad's step size, applied by the server to every push",
    )
    weight_average = forms.FloatField(
        label="Average of the weights (Downpour)",
        initial=0.0,
        min_value=0.0,
        max_value=MAX_WEIGHT_AVERAGE,
        required=False,
        help_text="above 0, the server also keeps a running average of the weights and "
        "scores and exports that: average = b × average + (1 − b) × weights after every "
        "update (b smaller over the first hundred updates, so the random start fades "
        "quickly). Many agents' stale pushes make the weights themselves noisy; 0.99 averages "
        "about the last 100 updates, and cut the simulated time to 90% by about a third on "
        "a long job. On a short one it did not help, and the server does a little more "
        "work per update. 0: off. Other algorithms ignore it",
    )
    inner_steps = forms.IntegerField(
        label="Steps per round (H)",
        initial=0,
        min_value=0,
        max_value=10_000,
        required=False,
        help_text="local steps only: how many steps an agent trains alone before sending its "
        "change. 0 lets the server choose for each agent, so that sending hides behind "
        "computing on its link",
    )
    inner_optimizer = forms.ChoiceField(
        label="Agents' optimizer",
        choices=[("adamw", "AdamW"), ("sgd-momentum", "SGD with momentum 0.9")],
        initial="adamw",
        required=False,
        help_text="local steps only: the optimizer each agent trains with between sends",
    )
    inner_learning_rate = forms.FloatField(
        label="Agents' learning rate",
        initial=0.001,
        min_value=1e-8,
        max_value=10,
        required=False,
        help_text="local steps only: the step size of the agents' optimizer",
    )
    outer_learning_rate = forms.FloatField(
        label="Server's learning rate",
        initial=1.0,
        min_value=1e-8,
        max_value=10,
        required=False,
        help_text="local steps only: how much of each agent's change the server applies (1: "
        "all of it, with momentum 0). A change made on older weights counts less: half if one "
        "other push landed after the agent fetched",
    )
    outer_momentum = forms.FloatField(
        label="Server's momentum",
        initial=0.0,
        min_value=0,
        max_value=0.999,
        required=False,
        help_text="local steps only: Nesterov momentum on the server. Raising it makes each "
        "step up to 1 + momentum times larger, so lower the learning rate with it (DiLoCo: 0.9 "
        "with 0.7, for agents whose changes are averaged). In our runs 0.9 overshot with "
        "agents pushing one after another",
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
    compression = forms.ChoiceField(
        label="Compression on the wire",
        choices=[
            ("none", "none: weights and gradients travel as 32-bit floats"),
            (
                "int8",
                "int8 with error feedback: about 4× fewer bytes per push; 3.2× fewer per "
                "sample in all, measured on a 1.1M-parameter MLP",
            ),
        ],
        initial="none",
        help_text="int8 sends each number in one byte (with a scale per 256 numbers); what "
        "rounding leaves out of a push is added to the agent's next push, and fetches send "
        "only the change since the agent's last copy. Agents too old to decode it get 32-bit "
        "floats",
    )
    max_staleness = forms.IntegerField(
        label="Most staleness accepted",
        initial=64,
        min_value=0,
        help_text="a push computed on weights more than this many updates old is refused "
        "rather than applied, so slow agents cannot drag the model back. With many donors "
        "every push is about as many updates old as there are donors, so a low bound "
        "throws most of their work away",
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
        help_text="centred clipping against faulty or malicious volunteers. The server sets "
        "the clipping centre itself from gradients it computes on a few hundred of your "
        "training examples; agents the operators vouch for add to it",
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
        if data.get("algorithm") == "local-steps" and data.get("robust_aggregation"):
            self.add_error(
                "robust_aggregation",
                "local steps cannot be combined with robust aggregation yet: untick one",
            )
        if data.get("algorithm") == "sandblaster" and data.get("robust_aggregation"):
            self.add_error(
                "robust_aggregation",
                "centred clipping works with Downpour only: untick it for a Sandblaster job",
            )
        if data.get("algorithm") == "sync" and data.get("robust_aggregation"):
            self.add_error(
                "robust_aggregation",
                "centred clipping works with Downpour only: untick it for a synchronous job",
            )
        return data
