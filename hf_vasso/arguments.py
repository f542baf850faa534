"""The VASSO hyperparameters as a dataclass mixin, and the `TrainingArguments` classes built from it.

`VassoArguments` holds only the VASSO fields, so it combines with any `TrainingArguments` subclass (Seq2Seq, TRL's
configs, a user's own) without overriding that class's defaults. The rule, for dataclass fields and `__post_init__`
alike: **the mixin comes first**, `class MyConfig(VassoArguments, SomeTrainingArguments)`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import logging

from .rules import refuse_deepspeed, refuse_mixin_after_base, validate_vasso_arguments

logger = logging.get_logger(__name__)


@dataclass
class VassoArguments:
    r"""
    The VASSO / eVASSO hyperparameters (Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance
    Suppression", arXiv 2309.15639, Algorithm 1; eVASSO from arXiv 2509.02433). A dataclass mixin: put it first in
    the bases of any `TrainingArguments` subclass, e.g. `class MyConfig(VassoArguments, Seq2SeqTrainingArguments)`.

    Parameters:
        rho (`float`, *optional*, defaults to `0.05`):
            Radius ρ of the adversarial perturbation `ε = ρ·d/‖d‖` (Euclidean, in parameter units). Must be >= 0;
            `0` trains with the base optimizer at twice the cost.
        theta (`float`, *optional*, defaults to `0.4`):
            Weight θ of the newest gradient in the moving average `d = (1 - θ)·d + θ·g`, in (0, 1]. `1.0` is SAM.
            The paper reports 0.4 best on ResNets and 0.2 under heavy label noise; the official code defaults to 0.9.
        adversary_prob (`float`, *optional*, defaults to `1.0`):
            Probability p that an optimizer step runs the adversary (two passes). Below 1 this is eVASSO: the other
            steps are one pass with the base optimizer, so a step costs `1 + p` passes on average. The coin is a
            function of (`seed`, step): the same on every rank and after a resume.
        sync_adversary (`bool`, *optional*, defaults to `True`):
            Under DDP, all-reduce the pass-1 gradient so every rank shares `d` and the adversary (one extra
            all-reduce per optimizer step; the run equals one process with the global batch). `False` gives each rank
            its own adversary from its own batch, with no extra communication (the SAM paper's m-sharpness).
        adversary (`str`, *optional*, defaults to `"vasso"`):
            The adversary geometry, by name: `"vasso"`, `ε = ρ·d/‖d‖`; `"asam"`, ASAM's scale-invariant adversary
            (Kwon et al., ICML 2021), `ε = ρ·T²d/‖T·d‖` with `T = |w|` elementwise (the convention of davda54/sam and
            pytorch_optimizer, with `d` in place of the gradient); or any name registered with
            `hf_vasso.adversary.register_geometry`. A param group's own `"adversary"` key overrides it.
        adaptive (`bool`, *optional*):
            davda54/sam's and pytorch_optimizer's switch, kept as an alias: `adaptive=True` is `adversary="asam"`.
            After construction it reads `adversary == "asam"`, so `adversary="asam"` wins over `adaptive=False`
            (a `dataclasses.replace` of a default config stays valid; the `VASSO` wrapper refuses the pair).

    Example:

    ```python
    @dataclass
    class VassoMyConfig(VassoArguments, MyTrainingArguments):  # MyTrainingArguments' defaults are kept
        pass
    ```

    Raises:
        ValueError: a hyperparameter out of range (naming it and the fix), DeepSpeed, an optimizer that steps inside
            `backward()` (`optim="lomo"`, `"adalomo"`, `"*_layerwise"`), or `ddp_static_graph` with a no-sync backward.
    """

    rho: float = field(
        default=0.05,
        metadata={"help": "Radius of the adversarial perturbation eps = rho * d / ||d|| (>= 0)."},
    )
    theta: float = field(
        default=0.4,
        metadata={
            "help": "Weight of the newest gradient in the moving average d, in (0, 1]. 1.0 is SAM; 0.4 is the "
            "paper's choice, 0.2 under heavy label noise."
        },
    )
    adversary_prob: float = field(
        default=1.0,
        metadata={
            "help": "Probability that a step runs the adversary (two passes), in [0, 1]. Below 1 is eVASSO, at an "
            "average cost of 1 + adversary_prob passes per step."
        },
    )
    sync_adversary: bool = field(
        default=True,
        metadata={
            "help": "Under DDP, all-reduce the pass-1 gradient so all ranks share one adversary (one extra "
            "all-reduce per step). False: each rank perturbs with its own gradient, no extra communication."
        },
    )
    adversary: str | None = field(
        default=None,
        metadata={
            "help": "The adversary geometry by name: 'vasso' (eps = rho * d / ||d||, the default) or 'asam' (eps = "
            "rho * |w|^2 d / || |w| d ||, Kwon et al., 2021), or a name registered with register_geometry."
        },
    )
    adaptive: bool | None = field(
        default=None,
        # nargs/const: a bare --adaptive still means True (HfArgumentParser adds them only for a non-None default)
        metadata={
            "help": "Alias of --adversary asam (davda54/sam's and pytorch_optimizer's switch).",
            "nargs": "?",
            "const": True,
        },
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_mixin_after_base(
            cls, VassoArguments, TrainingArguments, f"class {cls.__name__}(VassoArguments, TrainingArguments)"
        )

    def __post_init__(self) -> None:
        # Before TrainingArguments.__post_init__, which would otherwise fail on a missing deepspeed install with a
        # message about the install rather than about the real problem.
        refuse_deepspeed(getattr(self, "deepspeed", None))
        post_init = getattr(super(), "__post_init__", None)
        if post_init is not None:
            post_init()
        validate_vasso_arguments(self)


@dataclass
class VassoConfig(VassoArguments, TrainingArguments):
    r"""
    Configuration for [`VassoTrainer`]: every [`~transformers.TrainingArguments`] field plus the VASSO fields of
    [`VassoArguments`] (`rho`, `theta`, `adversary_prob`, `sync_adversary`, `adaptive`).
    `HfArgumentParser(VassoConfig)` gives `--rho`, `--theta`, ... next to every Trainer flag. Source: arXiv
    2309.15639 (NeurIPS 2023), extended as arXiv 2509.02433.

    Example:

    ```python
    from hf_vasso import VassoConfig, VassoTrainer

    args = VassoConfig(output_dir="out", rho=0.05, theta=0.4, learning_rate=5e-5)
    VassoTrainer(model=model, args=args, train_dataset=train_ds).train()
    ```

    Raises:
        ValueError: as [`VassoArguments`].
    """


@dataclass
class VassoSeq2SeqConfig(VassoArguments, Seq2SeqTrainingArguments):
    r"""
    Configuration for [`VassoSeq2SeqTrainer`]: every [`~transformers.Seq2SeqTrainingArguments`] field
    (`predict_with_generate`, `generation_max_length`, ...) plus the VASSO fields of [`VassoArguments`]
    (arXiv 2309.15639).

    ```python
    args = VassoSeq2SeqConfig(output_dir="out", rho=0.05, theta=0.4, predict_with_generate=True)
    ```

    Raises:
        ValueError: as [`VassoArguments`].
    """


# ---------------------------------------------------------------- upgrading arguments that lack the VASSO fields

# The ready classes serve their bases; other bases get a class built on first use.
_UPGRADED: dict[type, type] = {TrainingArguments: VassoConfig, Seq2SeqTrainingArguments: VassoSeq2SeqConfig}


def vasso_arguments_class(base: type) -> type:
    """`dataclass(VassoArguments, base)`, built once per base class, that pickles by reference to `base`."""
    if base not in _UPGRADED:
        namespace = {
            "__module__": __name__,
            "__reduce_ex__": _reduce_upgraded,
            "__doc__": base.__doc__,
            "_vasso_generated_from": base,
        }
        _UPGRADED[base] = dataclass(type(f"Vasso{base.__name__}", (VassoArguments, base), namespace))
    return _UPGRADED[base]


def register_vasso_arguments_class(base: type, vasso_class: type) -> None:
    """Upgrade arguments of class `base` to the ready class `vasso_class` (e.g. TRL's `SFTConfig` to
    `VassoSFTConfig`) instead of building a second class of the same name."""
    _UPGRADED[base] = vasso_class


def _reduce_upgraded(self: Any, protocol: int) -> tuple:
    generated = type(self).__dict__.get("_vasso_generated_from")
    if generated is None:  # a user's subclass of a generated class: importable by its own name
        return object.__reduce_ex__(self, protocol)
    return _rebuild_upgraded, (generated, self.__dict__.copy())


def _rebuild_upgraded(base: type, state: dict[str, Any]) -> Any:
    upgraded = object.__new__(vasso_arguments_class(base))
    upgraded.__dict__.update(state)
    return upgraded


def as_vasso_arguments(args: Any) -> Any:
    """`args` itself if it has the VASSO fields, else a copy of it that does.

    The copy keeps the class of `args` (it is an instance of a subclass of it) and every field, so callbacks and
    trainers that read their own fields keep working; `args` is not changed (list and dict fields are copied too)
    and its `__post_init__` is not re-run. A VASSO field that the class of `args` already defines (a user's own
    `rho`) keeps its value, which must then pass the VASSO rules; the others take their defaults.

    Raises:
        ValueError: `args` asks for something VASSO cannot run with (see `VassoArguments`), or a field of the same
            name as a VASSO field holds a value VASSO cannot take.
    """
    if isinstance(args, VassoArguments):
        return args
    upgraded = copy.copy(args)
    for name, value in vars(upgraded).items():
        if isinstance(value, (list, dict, set)):
            setattr(upgraded, name, copy.deepcopy(value))
    own = {f.name for f in dataclasses.fields(args)}
    upgraded.__class__ = vasso_arguments_class(type(args))
    for f in dataclasses.fields(VassoArguments):
        if f.name not in own:
            setattr(upgraded, f.name, f.default)
    clash = sorted(own & {f.name for f in dataclasses.fields(VassoArguments)})
    try:
        validate_vasso_arguments(upgraded)
    except ValueError as error:
        if not clash:
            raise
        raise ValueError(
            f"{error} ({type(args).__name__} defines its own {', '.join(clash)}, which VASSO reads as its "
            "hyperparameters: give them VASSO values, or rename your fields.)"
        ) from error
    if clash:  # the user's value is kept and read as VASSO's: say so, since its meaning may be another
        values = ", ".join(f"{name}={getattr(upgraded, name)!r}" for name in clash)
        logger.warning(
            f"{type(args).__name__} defines its own {', '.join(clash)}; VassoTrainer reads {values} as its VASSO "
            "hyperparameters. If your field means something else, rename it."
        )
    return upgraded
