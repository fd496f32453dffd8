"""Programs the tests start in processes of their own: scripts run by path (``script``) and
the functions ``tools.launch`` runs in each process of a multi-process job (``mp_jobs``,
``tier_jobs``). A script puts the repository's root first on its path, since it is run as a
file, not imported."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def script(name: str) -> str:
    """The path of the child script ``name`` (without ``.py``), to run as
    ``[sys.executable, path, ...]``."""
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no child script {path}")
    return path
