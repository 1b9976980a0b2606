"""Where every starting weight comes from: `bench weights` lists each expected file once with its rows, source and
status, `--verify` tells a file with the published checksum from one without, a counted run refuses a mismatched
file in one line, and a run on it is recorded as other starting weights. Synthetic files, with the provenance
table patched to their checksums."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from click.testing import CliRunner

from harness.cli import main
from harness.config.spec import load_all, load_spec
from harness.launch.options import RunOptions, validate_run
from harness.models import build_model, provenance
from harness.models.weights import apply_starting_weights, expected_files
from harness.paths import PROJECT_ROOT
from harness.report.verdicts import OTHER_WEIGHTS, standing
from tests.table_fixtures import full_budget_record


def publish(monkeypatch, name: str, content: bytes) -> None:
    """Make the provenance table publish the SHA-1 of `content` for `name`."""
    entry = provenance.PROVENANCE[name]
    monkeypatch.setitem(provenance.PROVENANCE, name,
                        dataclasses.replace(entry, sha1=hashlib.sha1(content).hexdigest()))


def table_lines(output: str) -> dict[str, str]:
    """The output's table entries by file name, each column's wrapped lines joined back (the table wraps its rows
    and sources to fit a terminal), the columns two spaces apart."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans, start = [], 0
    for dashes in lines[rule].split("  "):
        if dashes:
            spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    entries: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in lines[rule + 1:]:
        cells = [line[a:b].strip() for a, b in spans]
        if cells[0].endswith(".pth"):
            current = [[cell] for cell in cells]
            entries[Path(cells[0]).name] = current
        elif current and not cells[0] and any(cells):
            for column, cell in zip(current, cells):
                if cell:
                    column.append(cell)
    return {name: "  ".join(" ".join(column) for column in columns) for name, columns in entries.items()}


def test_each_expected_file_is_listed_once_with_its_rows_source_and_status(weights_dir):
    result = CliRunner().invoke(main, ["weights"])
    assert result.exit_code == 0, result.output
    expected: dict[str, list[str]] = {}
    for spec in load_all():
        for _, path in expected_files(spec):
            expected.setdefault(path.name, []).append(spec.row)
    lines = table_lines(result.stdout)
    assert set(lines) == set(expected) == set(provenance.PROVENANCE)
    for name, rows in expected.items():
        assert sum(1 for line in result.stdout.splitlines() if name in line) == 1, name
        line = lines[name]
        assert all(row in line for row in rows), (name, rows)
        assert line.rstrip().endswith(provenance.MISSING)
        source = provenance.PROVENANCE[name]
        assert source.source.split(",")[0] in line and (source.url is None or source.url in line)
    assert "hangzh.s3.amazonaws.com/encoding/models/resnet50-ebb6acbb.zip" in lines["resnet50-ebb6acbb.pth"]
    assert "ebb6acbbd1d1c90b7f446ae59d30bf70c74febc1" in lines["resnet50-ebb6acbb.pth"]
    assert "unknown" in lines["icnet_r50_pretrain.pth"] and "none published" in lines["icnet_r50_pretrain.pth"]
    assert "file(s) missing" in result.stderr


def test_verify_finds_the_published_file_ok_and_another_file_a_mismatch(weights_dir, monkeypatch):
    right, wrong = b"the published resnet50", b"a file that merely has the name"
    publish(monkeypatch, "resnet50-ebb6acbb.pth", right)
    publish(monkeypatch, "resnet101-2a57e44d.pth", b"the published resnet101")
    (weights_dir / "resnet50-ebb6acbb.pth").write_bytes(right)
    (weights_dir / "resnet101-2a57e44d.pth").write_bytes(wrong)
    (weights_dir / "df1_imagenet.pth").write_bytes(b"no checksum is published for this one")

    plain = CliRunner().invoke(main, ["weights"])
    assert plain.exit_code == 0 and provenance.NOT_VERIFIED in table_lines(plain.stdout)["resnet50-ebb6acbb.pth"]
    result = CliRunner().invoke(main, ["weights", "--verify"])
    assert result.exit_code == 1, result.output
    lines = table_lines(result.stdout)
    assert lines["resnet50-ebb6acbb.pth"].rstrip().endswith(provenance.CHECKSUM_OK)
    assert f"{provenance.CHECKSUM_MISMATCH} (SHA-1 {hashlib.sha1(wrong).hexdigest()[:12]}" \
        in lines["resnet101-2a57e44d.pth"]
    # No checksum is published for it, but its bytes are no PyTorch file: unusable, not "present".
    assert f"{provenance.UNREADABLE}: " in lines["df1_imagenet.pth"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "resnet101-2a57e44d.pth" in errors[0] and "df1_imagenet.pth" in errors[1]


def test_a_counted_run_refuses_a_mismatched_file_in_one_line(weights_dir, monkeypatch, tmp_path):
    publish(monkeypatch, "resnet50-ebb6acbb.pth", b"the published resnet50")
    (weights_dir / "resnet50-ebb6acbb.pth").write_bytes(b"another network's weights")
    root = tmp_path / "cityscapes"
    root.mkdir()
    result = CliRunner().invoke(main, ["run", "--row", "pspnet-r50", "--data-root", str(root)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "resnet50-ebb6acbb.pth" in lines[0] and provenance.CHECKSUM_MISMATCH in lines[0]
    assert "counted run refuses it" in lines[0] and "--iters" in lines[0]
    # A run that cannot count anyway (a chosen number of iterations) may train on it.
    validate_run(RunOptions(row="pspnet-r50", data_root=str(root), iters=2), [0], 1)


def test_a_run_on_a_mismatched_file_is_recorded_as_other_starting_weights(weights_dir, monkeypatch):
    spec = load_spec("df_seg_v1")
    model = build_model(spec)
    path = weights_dir / "df1_imagenet.pth"
    torch.save(model.backbone.state_dict(), path)
    content = path.read_bytes()

    publish(monkeypatch, "df1_imagenet.pth", content)
    assert apply_starting_weights(build_model(spec), spec) == f"loaded {path} (checksum ok)"
    publish(monkeypatch, "df1_imagenet.pth", content + b"!")
    status = apply_starting_weights(build_model(spec), spec)
    assert status.startswith(f"other {path} ({provenance.CHECKSUM_MISMATCH}")
    assert standing(spec, full_budget_record("df_seg_v1", 71.5, starting_weights=status)).kind == OTHER_WEIGHTS


def test_the_readme_says_where_each_file_comes_from():
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("### Where the starting weights come from"):]
    for name, source in provenance.PROVENANCE.items():
        assert name in section, name
        for fact in (source.url, source.sha1):
            if fact:
                assert fact.split(" ")[0] in section, (name, fact)
        if source.source == provenance.UNKNOWN:
            assert "unknown" in section.split(name, 1)[1].split("\n", 1)[0], name
