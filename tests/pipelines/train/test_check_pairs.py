"""`train`'s pairs checked before Ray starts: rows decoded as the workers will (all up to 512, else a seeded
sample of 256). None usable: one line naming file, row and field, exit 2, nothing written. Some usable: training
goes on and the workers skip the bad rows, counted by reason."""
from __future__ import annotations

import contextlib
import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.common.errors import InputError
from actors.common.runtime import png_bytes
from pipelines.cli import main
from pipelines.train.data import (
    build_trl_dataset,
    check_pairs,
    load_records,
    parquet_files,
)
from tests.conftest import tiny_yaml

NOWHERE = "127.0.0.1:9"   # nothing listens: a `train` that passed its checks stops at the Ray connection
GOOD = png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
TRUNCATED = GOOD[: len(GOOD) // 2]   # a PNG whose header opens: only a full decode finds it broken


def write_pairs(folder, images: list[bytes], files: int = 1, row_group_size: int | None = None, tag: str = "p"):
    """Rows i of `images`, spread over `files` files; pair_id f"{tag}{file}-{row in file}"."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(images) // files)
    for k in range(files):
        part = images[k * per:(k + 1) * per]
        pq.write_table(pa.table({
            "pair_id": [f"{tag}{k}-{r}" for r in range(len(part))], "image": pa.array(part, pa.binary()),
            "question": ["What colour is the square?"] * len(part), "chosen": ["red"] * len(part),
            "rejected": ["blue"] * len(part)}), folder / f"part-{k}.parquet", row_group_size=row_group_size)
    return folder


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_train_on_pairs_whose_images_are_all_garbage_stops_before_ray(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "pairs", [b"\x89PNG garbage %d" % i for i in range(6)], files=2)
    out = tmp_path / "run"
    code, err = run_cli(["train", tiny_yaml(tiny_models, tmp_path, str(out)), "--data", str(data),
                         "--address", NOWHERE])
    lines = [ln for ln in err.splitlines() if ln.startswith("synthalign: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{data / 'part-0.parquet'}, row 0, field 'image': undecodable image (pair_id 'p0-0')" in lines[0]
    assert "none of the 6 rows checked of 6 can be trained on (6 undecodable image)" in lines[0]
    assert not out.exists()                   # nothing written


def test_train_on_partly_bad_pairs_goes_on_and_the_workers_skip_the_bad_rows(tiny_models, tmp_path):
    images = [b"garbage"] * 4 + [TRUNCATED] + [GOOD] * 3
    data = write_pairs(tmp_path / "pairs", images)
    code, err = run_cli(["train", tiny_yaml(tiny_models, tmp_path, str(tmp_path / "run")), "--data", str(data),
                         "--address", NOWHERE])
    assert code == 2 and "nothing is listening" in err, err   # past every check: at the Ray connection
    dropped = build_trl_dataset(parquet_files(str(data)), tmp_path / "records")   # what each worker does
    assert dropped == {"undecodable image": 5}                # the truncated PNG too, not just the garbage
    assert len(load_records(tmp_path / "records")) == 3


def test_a_large_folder_is_sampled_and_the_error_names_the_sampled_row(tmp_path):
    data = write_pairs(tmp_path / "pairs", [b"junk"] * 700, files=3, row_group_size=50)
    with pytest.raises(InputError) as e:
        check_pairs(str(data), seed=3)
    msg = str(e.value)
    assert "none of the 256 rows checked of 700" in msg and "(256 undecodable image)" in msg
    k, row, pid_k, pid_row = re.search(r"part-(\d)\.parquet, row (\d+), field 'image': undecodable image "
                                       r"\(pair_id 'p(\d)-(\d+)'\)", msg).groups()
    assert (k, row) == (pid_k, pid_row)       # the named file and row hold the named pair
    with pytest.raises(InputError) as again:
        check_pairs(str(data), seed=3)
    assert str(again.value) == msg            # seeded: the same rows every time


def test_one_usable_row_among_garbage_passes_and_empty_files_do_not(tmp_path):
    data = write_pairs(tmp_path / "pairs", [b"junk"] * 9 + [GOOD])
    assert check_pairs(str(data)) == [str(data / "part-0.parquet")]
    empty = write_pairs(tmp_path / "empty", [])
    with pytest.raises(InputError, match="the pairs files hold no rows"):
        check_pairs(str(empty))
