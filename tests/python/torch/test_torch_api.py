"""kto_torch as a Python package (issue 24, item 5): its version is the library's, its
public names are exactly __all__ (no torch, Optional or Tensor leaking from a star
import), and it ships py.typed (PEP 561)."""

import re
from pathlib import Path

import pytest

kto_torch = pytest.importorskip("kto_torch")

CONFIG = Path(__file__).resolve().parents[3] / "include" / "kto" / "config.hpp"


def test_version_is_the_librarys():
    text = CONFIG.read_text()
    want = ".".join(re.search(rf"#define KTO_VERSION_{k} (\d+)", text).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))
    assert kto_torch.__version__ == want


def test_all_names_exist_and_star_import_is_clean():
    for name in kto_torch.__all__:
        assert hasattr(kto_torch, name), name
    namespace = {}
    exec("from kto_torch import *", namespace)  # noqa: S102 — the star import under test
    public = {k for k in namespace if not k.startswith("__")} | {"__version__"}
    assert public == set(kto_torch.__all__)
    assert not {"torch", "Optional", "Tensor", "NamedTuple"} & public


def test_ships_py_typed():
    assert (Path(kto_torch.__file__).parent / "py.typed").is_file()


def test_errors_are_kto_torch_classes_and_value_errors():
    import torch

    logits = torch.zeros(2, 3, 5)
    logits[1, 2, 4] = float("nan")
    targets = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(kto_torch.NonFiniteLogitsError) as caught:
        kto_torch.sequence_logprobs(logits, targets)
    error = caught.value
    assert isinstance(error, kto_torch.KTOError) and isinstance(error, ValueError)
    assert (error.sequence, error.row) == (1, 5)  # row 5 of the flattened [2, 3] rows
    assert error.function and "sequence_logprobs" in str(error)

    with pytest.raises(kto_torch.KTOError) as caught:  # the binding's own argument check
        kto_torch.sequence_logprobs(logits[:, :, :0], targets)
    assert isinstance(caught.value, ValueError)
    assert caught.value.argument and f"'{caught.value.argument}'" in str(caught.value)

    assert issubclass(kto_torch.PeerError, kto_torch.KTOError)
    import kto_torch.distributed as kto_dist

    assert kto_dist.PeerError is kto_torch.PeerError


def test_option_tables_are_the_library_contract():
    """The named options' values come from the library (kto::option_choices), not a copy;
    every option of its options array has a default."""
    assert kto_torch.LOSS_TYPES == {"kto": 0, "apo_zero_unpaired": 1}
    assert kto_torch.LINKS == {"one_minus_sigmoid": 0, "neg_log_sigmoid": 1}
    assert kto_torch.REFERENCE_POINTS == {"kl_batch": 0, "fixed": 1, "zero": 2}
    assert kto_torch.KL_ESTIMATORS == {"mean": 0, "nonempty_mean": 1}
    assert kto_torch.REDUCTIONS == {"mean": 0, "sum": 1}
    assert kto_torch._C.option_choices()["link"] == ["one_minus_sigmoid", "neg_log_sigmoid"]
    # The fused strategies too (kto::kFusedStrategyNames).
    assert kto_torch._C.strategy_names() == ["keep_chunk", "recompute", "vocab_blocks"]
    assert kto_torch.STRATEGIES == {"keep_chunk": 0, "recompute": 1, "vocab_blocks": 2}
    import torch

    want = r"kto_torch.kto_loss: argument 'link' must be one of \['neg_log_sigmoid', 'one_minus_sig"
    with pytest.raises(kto_torch.KTOError, match=want):
        kto_torch.kto_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), None,
                           torch.zeros(1), torch.ones(1, dtype=torch.bool), link="softplus",
                           reference_point="zero")
