"""Where the migrations, templates and static files are, installed or from a checkout."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The `migrations`, `templates` or `static` folder.

    A wheel ships them inside the package (see pyproject.toml); an editable install
    or a checkout keeps them at the top level of the repository.
    """
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"sse-llm's {name} folder is missing from the installation")
