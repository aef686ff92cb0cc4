"""A registered model's version by number or alias: the one lookup that `orbitgen eval`,
`models generate`, `models show` and `models promote` share, with one error that names what
exists (models, versions, aliases)."""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError
from jobs.tracking.registry_lock import is_lock


def parse_version_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME`, `NAME@ALIAS`, `NAME/VERSION` (optionally `models:/...`) -> (name, alias, version)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    name, _, version = body.partition("/")
    return name, None, version or None


def registered_names(client: MlflowClient) -> str:
    """The store's registered models, for an error message (promotion locks are not models)."""
    names = [m.name for m in client.search_registered_models() if not is_lock(m)]
    return f"registered: {', '.join(names)}" if names else "no model is registered in this store"


def registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"no registered model named {name!r}; {registered_names(client)}") from None


def version_numbers(client: MlflowClient, name: str) -> list[str]:
    # Ints from a local sqlite store, strings over REST.
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)


def model_version(client: MlflowClient, name: str, *, alias: str | None = None, number: str | None = None):
    """The version of `name` that `alias` (or else `number`) names."""
    aliases = {a: str(v) for a, v in (registered_model(client, name).aliases or {}).items()}
    listed = f"aliases: {', '.join(f'{a}=v{v}' for a, v in aliases.items()) or 'none'}"
    if alias is not None:
        if alias not in aliases:
            raise UserError(f"{name!r} has no alias {alias!r}; {listed}")
        number = aliases[alias]
    known = version_numbers(client, name)
    if str(number) not in known:
        raise UserError(f"{name!r} has no version {number}; versions: {', '.join(known) or 'none'}; {listed}")
    return client.get_model_version(name, str(number))


def version_of_ref(client: MlflowClient, ref: str):
    """The version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    name, alias, number = parse_version_ref(ref)
    if not name or not (alias or number):
        raise UserError(f"{ref!r} is neither models:/NAME@ALIAS nor models:/NAME/VERSION")
    return model_version(client, name, alias=alias, number=number)
