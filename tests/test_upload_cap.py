"""POST /uploads past NCLAB_MAX_UPLOAD_BYTES (issue 26): a 413, whether the length is declared or the body streamed,
and nothing kept; the cap of other bodies (NCLAB_MAX_BODY_BYTES) does not apply to a file. An app of its own: the
caps are read as it starts."""

import numpy as np

from tests.feature_files import safetensors_bytes
from tests.test_uploads import OCTET, stored_uploads

CAP = 2 << 20
# float64 features: 1.5 MiB, over the 1 MiB of other bodies and under the cap; and one row over the cap.
UNDER = safetensors_bytes(features=np.zeros((24_576, 8)), labels=np.arange(24_576) % 2)
OVER = safetensors_bytes(features=np.zeros((32_768, 8)), labels=np.arange(32_768) % 2)


def test_a_file_over_the_upload_cap_is_a_413_declared_or_streamed_and_nothing_is_kept(api_with):
    assert len(UNDER) > 1 << 20 and len(OVER) > CAP
    api = api_with(NCLAB_MAX_UPLOAD_BYTES=str(CAP))
    declared = api.client.post("/uploads", content=OVER, headers=OCTET)
    assert declared.status_code == 413 and "NCLAB_MAX_UPLOAD_BYTES" in declared.json()["detail"]
    streamed = api.client.post("/uploads", content=iter([OVER[: 1 << 20], OVER[1 << 20 :]]), headers=OCTET)
    assert streamed.status_code == 413 and "NCLAB_MAX_UPLOAD_BYTES" in streamed.json()["detail"]
    assert stored_uploads(api) == []
    assert api.client.post("/uploads", content=UNDER, headers=OCTET).status_code == 201
