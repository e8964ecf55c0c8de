"""Registries of classes by the type name that model files and pickles record (layers,
optimizers): files only ever build registered classes."""

__all__ = ["builtin", "register"]


def builtin(cls):
    """Whether ``cls`` is one of the cdl package's own classes."""
    return cls.__module__ == "cdl" or cls.__module__.startswith("cdl.")


def register(registry, cls):
    """Record ``cls`` in ``registry`` under its class name, unless another class holds
    that name (a built-in, or a user's class of another module): then it is recorded as
    "<module>.<qualname>", so that files and pickles holding either still load as what
    they were. Defining a class again under the same module and qualname (a notebook
    cell run twice) replaces the earlier one; a built-in defined after a user's class of
    its name takes the name back. Sets ``cls.type_name``."""
    name = cls.__name__
    held = registry.get(name)
    if held is not None and (held.__module__, held.__qualname__) != \
            (cls.__module__, cls.__qualname__):
        if builtin(cls) and not builtin(held):
            held.type_name = f"{held.__module__}.{held.__qualname__}"
            registry[held.type_name] = held
        else:
            name = f"{cls.__module__}.{cls.__qualname__}"
    cls.type_name = name
    registry[name] = cls
