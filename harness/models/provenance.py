"""Where every starting-weight file the rows expect comes from, and the checksum it must have where one is published.

This table is the one home of those facts: `bench weights` prints it (one line per file, with the rows that use it),
`--verify` and every run hash the present files against it, and the README's starting-weights section repeats it
for readers (a test keeps the two in step). Each entry records where the fact was found, so it can be checked
again. Nothing is downloaded: users fetch the files from the addresses below.

Checksums are SHA-1 of the .pth file itself, the algorithm PyTorch-Encoding's model store publishes (its file names
carry the first 8 hex digits). Where the public record has no checksum, `sha1` is None and a run cannot tell a
right file from a wrong one of the same name: `bench weights` says so.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSource:
    """One starting-weight file: its publisher and address as the public record gives them."""

    file: str  # the name the specs use under weights/
    source: str  # the publishing project, or "unknown"
    note: str  # what the file is, in a phrase
    url: Optional[str]  # the download address it publishes (None: no public address found)
    sha1: Optional[str]  # the published SHA-1 of the .pth (None: none published)
    layout: str  # the file's key layout (the family module documents the mapping)
    found: str  # where these facts were found

    @property
    def where(self) -> str:
        """Source and address in one phrase."""
        return f"{self.source}: {self.url}" if self.url else self.source


UNKNOWN = "unknown"

PROVENANCE: dict[str, WeightSource] = {source.file: source for source in (
    WeightSource(
        file="resnet50-ebb6acbb.pth",
        source="PyTorch-Encoding",
        note="Hang Zhang's deep-stem ImageNet ResNet-50 of the v0.5 model store (v1.0 replaced it by 25c4b509)",
        url="https://hangzh.s3.amazonaws.com/encoding/models/resnet50-ebb6acbb.zip (unzip: the .pth)",
        sha1="ebb6acbbd1d1c90b7f446ae59d30bf70c74febc1",
        layout="deep stem conv1.0/.1/.3/.4/.6, bn1, layer1-4, fc (harness.models.seg_resnet)",
        found="zhanghang1989/PyTorch-Encoding encoding/models/model_store.py at f8919197 (v0.5.0, 2018-09-26; "
              "V1.0.0 ce461dae replaced `resnet50` by 25c4b509; the store later moved to "
              "s3.us-west-1.wasabisys.com/encoding and the newest model_store.py, ac748410, lists neither ResNet); "
              "UP configs/seg/deeplabv3/deeplabv3_r50.yaml saver.pretrain_model and "
              "up/tasks/seg/models/encoder/seg_resnet.py model_urls at c477a744",
    ),
    WeightSource(
        file="resnet101-2a57e44d.pth",
        source="PyTorch-Encoding",
        note="Hang Zhang's deep-stem ImageNet ResNet-101 of the model store",
        url="https://hangzh.s3.amazonaws.com/encoding/models/resnet101-2a57e44d.zip (unzip: the .pth)",
        sha1="2a57e44de9c853fa015b172309a1ee7e2d0e4e2a",
        layout="deep stem conv1.0/.1/.3/.4/.6, bn1, layer1-4, fc (harness.models.seg_resnet)",
        found="zhanghang1989/PyTorch-Encoding encoding/models/model_store.py at f8919197 and ce461dae "
              "(commented out at 3a300922, gone from the newest, ac748410); UP configs/seg/deeplabv3/"
              "deeplabv3_r101.yaml saver.pretrain_model at c477a744",
    ),
    WeightSource(
        file="resnet18-deep.pth",
        source="lxtGH/SFSegNets",
        note="Xiangtai Li's deep-stem ImageNet ResNet-18, 'resnet18-deep-stem-pytorch' (SFSegNets loads it as "
             "resnet18-deep-inplane128.pth; that it is UP's file byte for byte is unknown)",
        url="https://drive.google.com/file/d/16mcWZSWbV3hkFWJ2cP_eJRQ6Nr1BncCp/view",
        sha1=None,
        layout="deep stem conv1.0/.1/.3/.4/.6 (64-64-128), bn1, layer1-4, fc (harness.models.seg_resnet)",
        found="lxtGH/SFSegNets README.md 'pretrained imagenet models' and network/resnet_d.py at ba475baf; UP "
              "up/tasks/seg/models/encoder/seg_resnet.py model_urls (/mnt/lustre/lixiangtai/pretrained/"
              "resnet18-deep.pth) and configs/seg/BiSeNet/BiSeNet.yaml at c477a744; no checksum published",
    ),
    WeightSource(
        file="icnet_r50_pretrain.pth",
        source=UNKNOWN,
        note="UP's ICNet config names ./icnet_r50_pretrain.pth; no public file of that name was found",
        url=None,
        sha1=None,
        layout="UP whole-model names backbone.backbone.<deep-stem ResNet-50 name>, or plain ResNet names "
               "(harness.models.icnet)",
        found="UP configs/seg/icnet/icnet.yaml `pretrain_model: ./icnet_r50_pretrain.pth  # you may need convert "
              "key` at c477a744; no public file of this name found (code search for the name: no hit)",
    ),
    WeightSource(
        file="df1_imagenet.pth",
        source="lxtGH/SFSegNets",
        note="Xiangtai Li's ImageNet DFNet1, 'dfnetv1' of SFSegNets' pretrained ImageNet models",
        url="https://drive.google.com/file/d/1xkkmIjKUbMifcrKdWU7I_-Jx_1YQAXfN/view",
        sha1=None,
        layout="stage1.{0,1,3,4}, stage2-5.<block>.{conv,bn}1/2, downsample.0/1, fc (harness.models.dfnet)",
        found="lxtGH/SFSegNets README.md and network/dfnet.py model_urls (./pretrained_models/df1_imagenet.pth) at "
              "ba475baf; UP configs/seg/DF_seg/DF_seg_v1.yaml and up/tasks/seg/models/encoder/dfnet_encoder.py "
              "(/mnt/lustre/share/HiLight/model_zoo/df1_imagenet.pth) at c477a744; no checksum published",
    ),
    WeightSource(
        file="df2_imagenet.pth",
        source="lxtGH/SFSegNets",
        note="Xiangtai Li's ImageNet DFNet2, 'dfnetv2' of SFSegNets' pretrained ImageNet models",
        url="https://drive.google.com/file/d/1ZRRE99BPhbXwq-ZzO8A5GFmfCe7zxMsz/view",
        sha1=None,
        layout="stage1.{0,1,3,4}, stage2_1..stage4_2.<block>.{conv,bn}1/2, downsample.0/1, fc "
               "(harness.models.dfnet)",
        found="lxtGH/SFSegNets README.md and network/dfnet.py model_urls at ba475baf; UP "
              "configs/seg/DF_seg/DF_seg_v2.yaml at c477a744; no checksum published",
    ),
    WeightSource(
        file="df_seg_v1_mseg.pth",
        source=UNKNOWN,
        note="the MSeg-trained DF-Seg v1 of UP's table, which links no checkpoint",
        url=None,
        sha1=None,
        layout="a whole DF-Seg v1 model (UP's encoder.*/decoder.* or segbench's names); its classifier is "
               "re-initialised for 19 classes (harness.models.weights)",
        found="UP benchmark/semantic_benchmark.md row 'df_seg_v1 mseg pretrain' links an empty [ckpt]() at "
              "c477a744; MSeg's own releases (mseg-dataset/mseg-semantic) are HRNet-W48 models, no DFNet; the file "
              "name is segbench's",
    ),
)}


def source_of(path: Path) -> Optional[WeightSource]:
    """The table's entry for a file, by its name (a file of any other name has no entry)."""
    return PROVENANCE.get(Path(path).name)


_HASHES: dict[tuple[str, int, int], str] = {}


def sha1_of(path: Path) -> str:
    """The file's SHA-1, computed once per (path, size, modification time) in this process: a run hashes its file
    when it is checked and again when it is loaded."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


# What a check of one file found.
MISSING = "missing"
NOT_VERIFIED = "present, not verified"
CHECKSUM_OK = "present, checksum ok"
CHECKSUM_MISMATCH = "checksum mismatch"
NO_CHECKSUM = "present, no published checksum"
UNREADABLE = "unreadable"  # the file cannot be read, or holds no tensors fit for the rows that use it


@dataclass(frozen=True)
class FileCheck:
    path: Path
    source: Optional[WeightSource]
    status: str  # one of the six above
    sha1: Optional[str] = None  # the file's, when hashed
    reason: str = ""  # why an UNREADABLE file is unusable

    @property
    def mismatch(self) -> bool:
        return self.status == CHECKSUM_MISMATCH

    @property
    def unusable(self) -> bool:
        """Present but no file a run can start from: another file than the published one, or unreadable."""
        return self.status in (CHECKSUM_MISMATCH, UNREADABLE)

    def describe(self) -> str:
        """The status with what the hash found."""
        if self.status == UNREADABLE:
            return f"{self.status}: {self.reason}"
        if self.status == CHECKSUM_MISMATCH and self.source is not None and self.sha1 is not None:
            return f"{self.status} (SHA-1 {self.sha1[:12]}, the published is {str(self.source.sha1)[:12]})"
        if self.status == NO_CHECKSUM and self.sha1 is not None:
            return f"{self.status} (SHA-1 {self.sha1[:12]})"
        return self.status


def check_file(path: Path, verify: bool = True) -> FileCheck:
    """Whether `path` is there and, with `verify`, whether its SHA-1 is the published one."""
    source = source_of(path)
    if not Path(path).is_file():
        return FileCheck(path, source, MISSING)
    published = source.sha1 if source is not None else None
    if not verify:
        return FileCheck(path, source, NOT_VERIFIED if published else NO_CHECKSUM)
    try:
        digest = sha1_of(path)
    except OSError as exc:
        return FileCheck(path, source, UNREADABLE, reason=f"cannot read it ({exc.strerror or exc}); fix its "
                                                          "permissions or fetch it again")
    if published is None:
        return FileCheck(path, source, NO_CHECKSUM, digest)
    return FileCheck(path, source, CHECKSUM_OK if digest == published.lower() else CHECKSUM_MISMATCH, digest)
