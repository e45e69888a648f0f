"""Login with throttling (see ``throttle``)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse

from . import throttle

LOCKED_OUT = "Too many failed logins. Wait a few minutes, then try again."


def client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR") or "unknown")


class ThrottledLoginView(auth_views.LoginView):
    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = str(request.POST.get("username", ""))
        address = client_address(request)
        if throttle.locked_out(username, address):
            form = self.get_form()
            form.errors.clear()
            form.add_error(None, LOCKED_OUT)
            response = self.render_to_response(self.get_context_data(form=form))
            response.status_code = 429
            return response
        return super().post(request, *args, **kwargs)

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        throttle.record_success(form.get_user().get_username(), client_address(self.request))
        return super().form_valid(form)

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        username = str(self.request.POST.get("username", ""))
        throttle.record_failure(username, client_address(self.request))
        return super().form_invalid(form)
