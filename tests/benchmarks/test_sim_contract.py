"""The cluster simulation's stand-ins take their column contracts from the real stages (actors.contract.STAGES):
one per stage, and a stage's columns changed in its module are the stand-in's at once."""
from __future__ import annotations

import pyarrow as pa

from actors.contract import PROMPT_COLUMNS, STAGES, check_chain
from actors.select import ImageSelection
from benchmarks import sim


def test_every_stage_has_a_stand_in_with_the_real_contract():
    assert set(sim.SIM_STAGES) == {st.pool for st in STAGES}
    for st in STAGES:
        stand_in = sim.SIM_STAGES[st.pool]
        assert stand_in.REAL is st.cls
        assert (stand_in.REQUIRES, stand_in.ADDS, stand_in.DROPS) == \
            (st.cls.REQUIRES, st.cls.ADDS, getattr(st.cls, "DROPS", ()))


def test_the_simulated_chain_passes_the_contract_check_the_real_one_does():
    real = [c for st in STAGES for c in ([st.cls] + ([st.then] if st.then else []))]
    swapped = [c for st in STAGES for c in ([sim.SIM_STAGES[st.pool]] + ([st.then] if st.then else []))]
    assert check_chain(PROMPT_COLUMNS, swapped) == check_chain(PROMPT_COLUMNS, real)


def test_a_contract_change_reaches_the_stand_in(monkeypatch):
    """A stand-in defined after the real class changed its columns carries the change (nothing copied)."""
    monkeypatch.setattr(ImageSelection, "DROPS", ImageSelection.DROPS + ("candidate_seeds",))

    class Later(sim._SimStage):
        KEY = "selection"
    assert "candidate_seeds" in Later.DROPS
    table = pa.table({"candidate_images": [[b"a", b"b"]], "candidate_seeds": [[1, 2]],
                      "candidate_guidance": [[5.0, 7.0]], "image_prompt": ["p"], "gt_objects": [["x"]]})
    out, items = sim.SimSelection.fill(Later.__new__(Later), table)
    assert items == 2 and "candidate_seeds" not in out.column_names and "candidate_images" not in out.column_names
