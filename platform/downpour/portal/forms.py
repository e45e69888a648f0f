from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.forms import UserCreationForm

from downpour.accounts.models import User
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
    n_shards = forms.IntegerField(min_value=1, max_value=256, initial=4)


class JobForm(forms.Form):
    name = forms.CharField(max_length=100)
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none())
    model_json = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8}),
        required=False,
        help_text="the output of model.to_json()",
    )
    model_file = forms.FileField(required=False, help_text="or upload the JSON file")
    loss = forms.ChoiceField(
        choices=[
            (c, c)
            for c in (
                "sparse_categorical_crossentropy",
                "categorical_crossentropy",
                "binary_crossentropy",
                "mean_squared_error",
            )
        ]
    )
    learning_rate = forms.FloatField(initial=0.05, min_value=1e-8, max_value=10)
    batch_size = forms.IntegerField(initial=32, min_value=1, max_value=65536)
    n_fetch = forms.IntegerField(initial=1, min_value=1)
    n_push = forms.IntegerField(initial=1, min_value=1)
    n_param_shards = forms.IntegerField(initial=2, min_value=1, max_value=64)
    max_staleness = forms.IntegerField(initial=16, min_value=0)
    staleness_aware_lr = forms.BooleanField(
        required=False, help_text="divide each push's step by its staleness (Zhang et al. 2016)"
    )
    warm_start_pushes = forms.IntegerField(
        initial=0, min_value=0, help_text="one agent alone for the first K pushes (0: off)"
    )
    robust_aggregation = forms.BooleanField(
        required=False,
        initial=True,
        help_text="centred clipping against faulty or malicious volunteers. The server sets "
        "the clipping centre itself from gradients it computes on a few hundred of your "
        "training examples; agents the operators vouch for add to it",
    )
    target_accuracy = forms.FloatField(
        required=False, min_value=0.0001, max_value=1, help_text="fraction, e.g. 0.95"
    )
    budget_samples = forms.IntegerField(required=False, min_value=1)
    budget_seconds = forms.FloatField(required=False, min_value=1)
    initial_weights = forms.FileField(
        required=False,
        help_text="optional .npz to start from, e.g. a finished job's weights.npz: one float32 "
        "array per variable, named as in that download",
    )
    spot_check_fraction = forms.FloatField(
        initial=0.05,
        min_value=0,
        max_value=1,
        required=False,
        help_text="fraction of work units a trusted worker recomputes to catch faked "
        "gradients; 0.05 catches an always-faking agent within 100 units with p ≥ 0.99",
    )

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
