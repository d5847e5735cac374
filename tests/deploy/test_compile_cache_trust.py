"""The compile caches hold pickles and libraries the service loads and runs: in the image they must lie in a
folder only the service's user can write (docs/serving.md#warm-up, docs/deployment.md#compile-cache)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from tests.deploy.test_deploy_files import final

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "XDG_CACHE_HOME")
SHARED = ("/tmp", "/var/tmp", "/dev/shm")


def test_compile_caches_lie_in_a_folder_owned_by_the_service_user_alone() -> None:
    stage = final()
    runs = " ".join(i.value for i in stage.all("RUN"))
    uid_given = re.search(r"useradd\b[^&]*--uid (\d+)", runs)
    home_given = re.search(r"useradd\b[^&]*--home-dir (\S+)", runs)
    assert uid_given and home_given, "the runtime stage creates the service's user with a uid and a home"
    uid, home = uid_given.group(1), PurePosixPath(home_given.group(1))
    chowned = re.findall(r"chown (?:-R )?\S+:\S+((?: /\S+)+)", runs)
    owned = [PurePosixPath(path) for paths in chowned for path in paths.split()]
    assert home in owned, f"{home} is chowned to the service's user"
    assert "chmod" not in runs, "no chmod loosens the folders' default mode (0755 under Docker's umask 022)"
    assert stage.all("USER")[-1].value.split(":")[0] == uid, "the service runs as the user that owns the cache"
    env = stage.env()
    for name in CACHE_VARIABLES:
        path = PurePosixPath(env[name])
        assert path.is_relative_to(home), f"{name} ({path}) lies under {home}"
        assert not any(path.is_relative_to(s) for s in SHARED), f"{name} ({path}) is in a folder others can write"
