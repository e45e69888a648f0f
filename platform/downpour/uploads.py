"""The first upload handler: counts a request's file bytes as they stream and stops past the cap.

The body caps (``downpour.bodylimits``) already bound the whole request; this stops the
multipart parser as soon as the files alone pass ``DATASET_MAX_BYTES`` or come from an
anonymous request, so nothing past the limit is written to disk either.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload

#: Set in ``request.META`` when a file was stopped past ``DATASET_MAX_BYTES``.
OVER_LIMIT = "downpour.upload_over_limit"


class BoundedUploadHandler(FileUploadHandler):
    def __init__(self, request: Any = None) -> None:
        super().__init__(request)
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        user = getattr(self.request, "user", None)
        if user is None or not user.is_authenticated:
            raise StopUpload(connection_reset=True)
        self.received += len(raw_data)
        if self.received > settings.DATASET_MAX_BYTES:
            assert self.request is not None
            self.request.META[OVER_LIMIT] = True  # the view turns it into a form error
            raise StopUpload(connection_reset=False)
        return raw_data  # on to the next handler, which stores it

    def file_complete(self, file_size: int) -> None:
        return None
