"""Classes registered by name: the one table type behind every `register_*` of hf_prune.

Weight-pruning methods and the head/neuron, hidden-channel and layer importance criteria are each chosen by a string
(`PruningConfig.method`, `compute_channel_importance(method=...)`), so a user's criterion works wherever a built-in
does. They share this table so that registering, the decorator form, `overwrite=` and the error for an unknown name
behave the same everywhere.
"""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar, Union, overload

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Subclasses of `base` by name, in registration order.

    Args:
        base: the class every registered class must subclass (exported as `hf_prune.<base name>`).
        kind / kinds: what an entry is called in messages, singular and plural ("method", "methods").
        register_name: the public function that registers into this table (named in messages).
    """

    def __init__(self, base: type, kind: str, kinds: str, register_name: str) -> None:
        self.base = base
        self.kind = kind
        self.kinds = kinds
        self.register_name = register_name
        self.classes: dict[str, T] = {}

    @overload
    def register(self, name: str, cls: None = None, *, overwrite: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, cls: T, *, overwrite: bool = False) -> T: ...

    def register(self, name: str, cls: Optional[T] = None, *, overwrite: bool = False) -> Union[T, Callable[[T], T]]:
        """Register `cls` under `name` and return it; without `cls`, return a class decorator that does so.

        Re-registering a name with another class raises unless `overwrite=True`; the same class again is a no-op, so
        a module imported twice (notebook reloads) does not fail.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.register_name}: name={name!r} is invalid: give a non-empty string.")

        def add(new: T) -> T:
            if not (isinstance(new, type) and issubclass(new, self.base)):
                raise TypeError(
                    f"{self.register_name}({name!r}, ...) takes a subclass of hf_prune.{self.base.__name__}, "
                    f"got {new!r}."
                )
            old = self.classes.get(name)
            if old is not None and old is not new and not overwrite:
                raise ValueError(
                    f"{self.register_name}: a {self.kind} named {name!r} is already registered ({old.__name__}); "
                    "pass overwrite=True to replace it."
                )
            new.name = name
            self.classes[name] = new
            return new

        return add if cls is None else add(cls)

    def unregister(self, name: str) -> None:
        self.classes.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def get(self, name: str, option: str) -> T:
        """The class registered under `name`; a ValueError naming `option`, the value and the registered names
        otherwise."""
        try:
            return self.classes[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list from a YAML file)
            raise ValueError(
                f"{option}={name!r} is invalid: choose one of the registered {self.kinds} {list(self.names())} or "
                f"register one with hf_prune.{self.register_name}."
            ) from None
