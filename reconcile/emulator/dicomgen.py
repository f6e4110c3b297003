"""Synthetic Siemens-like MR DICOM for the emulator, the demo, tests and benchmarks.

Owns the byte-level recipe (public tags, Siemens CSA headers with an ASCCONV protocol,
tiny deterministic pixel data) that real heudiconv (ReproIn) and dcm2niix accept and that
yields a BIDS dataset the validator passes. It must stay pure: no clock, no randomness
that is not derived from its arguments; only `write_session` touches the disk.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["DEFAULT_SERIES", "KINDS", "SeriesSpec", "SyntheticScan", "session_scans", "write_session"]

KINDS = ("anat", "func", "fmap_mag", "fmap_phase", "dwi", "scout")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# Fixed, so that output does not change with the installed pydicom version.
IMPLEMENTATION_UID = "2.25.153004385935468416404911542236617716327"
IMPLEMENTATION_VERSION = "XNAT2BIDS_SYN1"
SESSION_START_S = 9 * 3600  # first series at 09:00:00
SERIES_GAP_S = 30.0


@dataclass(frozen=True)
class SeriesSpec:
    """One acquisition as the scanner operator would register it (ReproIn name + shape).

    `kind` picks the sequence recipe; `None` timing fields take the kind's default.
    For "dwi", volume 0 is b=0 and the others are b=`b_value` along successive axes.
    `mosaic` (func only): one file per volume with its slices tiled, as Siemens scanners before
    XA write EPI.
    """

    description: str
    kind: str
    n_slices: int = 4
    n_volumes: int = 1
    n_echoes: int = 1
    matrix: int = 16
    voxel_mm: float = 3.0
    repetition_time_ms: float | None = None
    echo_times_ms: tuple[float, ...] | None = None
    b_value: int = 1500
    mosaic: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown series kind {self.kind!r}; expected one of {KINDS}")
        if min(self.n_slices, self.n_volumes, self.n_echoes, self.matrix) < 1:
            raise ValueError("n_slices, n_volumes, n_echoes and matrix must be >= 1")
        if self.kind == "dwi" and self.n_volumes < 2:
            raise ValueError("a dwi series needs a b=0 volume and at least one direction")
        if self.mosaic and (self.kind != "func" or self.n_echoes != 1):
            raise ValueError("mosaic applies to single-echo func series")


DEFAULT_SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("anat-scout_acq-localizer", "scout", n_slices=3),
    SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=8, voxel_mm=2.0),
    SeriesSpec("func-bold_task-rest", "func", n_volumes=4),
    SeriesSpec("func-bold_task-checks_run+", "func", n_volumes=3),
    SeriesSpec("func-bold_task-checks_run+", "func", n_volumes=3),
    SeriesSpec("fmap_acq-boldGRE", "fmap_mag", n_echoes=2),
    SeriesSpec("fmap_acq-boldGRE", "fmap_phase"),
    SeriesSpec("dwi_acq-b1500_dir-ap", "dwi", n_volumes=4),
)


@dataclass(frozen=True)
class SyntheticScan:
    """One generated series, keyed like an XNAT scan."""

    scan_id: str
    series_description: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class _Recipe:
    """Sequence parameters a Siemens scanner would write for one kind of series."""

    image_type: tuple[str, ...]
    sequence_name: str
    sequence_file: str
    scanning_sequence: str
    sequence_variant: str
    scan_options: str
    acquisition_type: str
    tr_ms: float
    te_ms: tuple[float, ...]
    flip_angle: float
    pixel_bandwidth: float
    epi: bool = False
    inversion_ms: float | None = None


_RECIPES: dict[str, _Recipe] = {
    "scout": _Recipe(("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "*fl2d1", "%SiemensSeq%\\haste",
                     "GR", "SP\\OSP", "", "2D", 8.6, (4.0,), 20.0, 320.0),
    "anat": _Recipe(("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "*tfl3d1_16ns", "%SiemensSeq%\\tfl",
                    "GR\\IR", "SK\\SP\\MP", "IR", "3D", 2530.0, (1.69,), 7.0, 650.0, inversion_ms=1100.0),
    "func": _Recipe(("ORIGINAL", "PRIMARY", "M", "ND"), "epfid2d1_16", "%SiemensSeq%\\ep2d_bold",
                    "EP", "SK\\SS", "FS", "2D", 2000.0, (30.0,), 90.0, 2298.0, epi=True),
    "fmap_mag": _Recipe(("ORIGINAL", "PRIMARY", "M", "ND"), "*fm2d2r", "%SiemensSeq%\\gre_field_mapping",
                        "GR", "SP", "", "2D", 400.0, (4.92, 7.38), 60.0, 290.0),
    "fmap_phase": _Recipe(("ORIGINAL", "PRIMARY", "P", "ND"), "*fm2d2r", "%SiemensSeq%\\gre_field_mapping",
                          "GR", "SP", "", "2D", 400.0, (4.92, 7.38), 60.0, 290.0),
    "dwi": _Recipe(("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"), "ep_b0", "%SiemensSeq%\\ep2d_diff",
                   "EP", "SK\\SP", "PFP\\FS", "2D", 3200.0, (89.0,), 90.0, 1860.0, epi=True),
}

# Scout slices cycle through the three planes; everything else has one orientation.
_AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
_SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
_CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
_SCOUT_PLANES = (_SAGITTAL, _CORONAL, _AXIAL)
_DWI_DIRECTIONS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                   (0.7071068, 0.7071068, 0.0), (0.7071068, 0.0, 0.7071068), (0.0, 0.7071068, 0.7071068))

# CSA value representations -> Siemens "syngo data type" codes (informative only).
_SYNGODT = {"CS": 16, "DS": 3, "FD": 4, "IS": 6, "LO": 19, "SH": 22, "SL": 7, "UL": 9, "UN": 0, "US": 10, "ST": 20}


# --------------------------------------------------------------------------------------
# public API


def session_scans(
    subject: str,
    session: str,
    *,
    series: Sequence[SeriesSpec] = DEFAULT_SERIES,
    study_date: str = "20240110",
    seed: int = 0,
) -> list[SyntheticScan]:
    """Generate every series of one MR session; same arguments give byte-identical output."""
    if len(study_date) != 8 or not study_date.isdigit():
        raise ValueError(f"study_date must be YYYYMMDD, got {study_date!r}")
    ctx = _Session(subject=subject, session=session, study_date=study_date, seed=seed)
    scans: list[SyntheticScan] = []
    start_s = SESSION_START_S + _rng(seed, subject, session, "start").randrange(0, 3600)
    for number, spec in enumerate(series, start=1):
        files = dict(_series_files(ctx, spec, number, start_s))
        scans.append(SyntheticScan(scan_id=str(number), series_description=spec.description, files=files))
        start_s += _series_duration_s(spec) + SERIES_GAP_S
    return scans


def write_session(
    dest: Path,
    subject: str,
    session: str,
    *,
    series: Sequence[SeriesSpec] = DEFAULT_SERIES,
    study_date: str = "20240110",
    seed: int = 0,
) -> list[SyntheticScan]:
    """Write `session_scans(...)` as `dest/<scan_id>/<relpath>` and return the scans."""
    scans = session_scans(subject, session, series=series, study_date=study_date, seed=seed)
    for scan in scans:
        for relpath, data in scan.files.items():
            path = Path(dest) / scan.scan_id / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return scans


# --------------------------------------------------------------------------------------
# session-wide identity


@dataclass(frozen=True)
class _Session:
    subject: str
    session: str
    study_date: str
    seed: int

    def uid(self, *parts: object) -> str:
        return _uid(self.seed, self.subject, self.session, *parts)


def _uid(*parts: object) -> str:
    # Same construction as pydicom's generate_uid(prefix=None, entropy_srcs=...): 2.25.<int>.
    digest = hashlib.sha512("\x1f".join(map(str, parts)).encode()).hexdigest()
    return "2.25." + str(int(digest, 16))[:37].lstrip("0")


def _rng(*parts: object) -> random.Random:
    # str seeds go through sha512, so this is stable across runs and PYTHONHASHSEED.
    return random.Random("\x1f".join(map(str, parts)))


def _series_duration_s(spec: SeriesSpec) -> float:
    recipe = _RECIPES[spec.kind]
    tr_s = (spec.repetition_time_ms or recipe.tr_ms) / 1000.0
    if recipe.epi:
        return spec.n_volumes * tr_s
    if recipe.acquisition_type == "3D":
        return spec.n_slices * spec.matrix * tr_s
    return spec.matrix * tr_s


# --------------------------------------------------------------------------------------
# one series


def _series_files(ctx: _Session, spec: SeriesSpec, number: int, start_s: float) -> Iterator[tuple[str, bytes]]:
    recipe = _RECIPES[spec.kind]
    tr_ms = spec.repetition_time_ms or recipe.tr_ms
    echo_times = spec.echo_times_ms or recipe.te_ms
    if spec.kind == "fmap_phase":
        # gre_field_mapping: one series with both echoes' magnitudes (n_echoes=2), then one
        # phase-difference series labelled with TE2.
        file_echoes: tuple[int, ...] = (len(echo_times) - 1,)
    else:
        file_echoes = tuple(range(min(spec.n_echoes, len(echo_times))))
    shim = _session_shim(ctx)
    ds = _series_template(ctx, spec, recipe, number, tr_ms, echo_times, start_s, shim)
    if spec.mosaic:
        yield from _mosaic_files(ctx, spec, recipe, ds, tr_ms, start_s)
        return
    encoder = _SeriesEncoder(ds)
    series_uid = ds.SeriesInstanceUID
    n_dirs = len(_DWI_DIRECTIONS)

    instance = 0
    for volume in range(spec.n_volumes):
        for echo in file_echoes:
            for slice_ in range(spec.n_slices):
                instance += 1
                row, col = _SCOUT_PLANES[slice_ % 3] if spec.kind == "scout" else _orientation(spec.kind)
                # Each scout plane is a single slice through isocentre.
                centre = (spec.n_slices - 1) / 2 if spec.kind == "scout" else slice_
                position = _slice_position(spec, row, col, centre)
                normal = _cross(row, col)
                t_s = start_s + _acquisition_offset_s(spec, recipe, tr_ms, volume, slice_)

                ds.SOPInstanceUID = ctx.uid("sop", series_uid, instance)
                ds.InstanceNumber = instance
                ds.AcquisitionNumber = volume + 1
                ds.EchoNumbers = echo + 1
                ds.EchoTime = _ds(echo_times[echo])
                ds.AcquisitionTime = ds.ContentTime = _tm(t_s)
                ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
                ds.ImagePositionPatient = [_ds(v) for v in position]
                ds.SliceLocation = _ds(_dot(position, normal))

                bvalue, direction = 0, None
                if spec.kind == "dwi" and volume > 0:
                    bvalue, direction = spec.b_value, _DWI_DIRECTIONS[(volume - 1) % n_dirs]
                if spec.kind == "dwi":
                    ds.SequenceName = f"ep_b{bvalue}#{volume}" if bvalue else "ep_b0"
                    _set_diffusion(ds, bvalue, direction)
                ds[0x0029, 0x1010].value = _csa2(_image_csa(spec, recipe, ds, normal, slice_, t_s - start_s,
                                                            bvalue, direction))
                ds.PixelData = _pixels(ctx, spec, series_uid, volume, echo, slice_)
                yield f"{instance}.dcm", encoder.encode()


def _mosaic_files(ctx: _Session, spec: SeriesSpec, recipe: _Recipe, ds: Dataset, tr_ms: float,
                  start_s: float) -> Iterator[tuple[str, bytes]]:
    """One file per volume, its slices tiled row by row in a square grid (empty tiles black).

    The position is that of the whole mosaic's first voxel, as if it were one large image;
    readers move it to the first slice's with the mosaic and slice sizes."""
    n, grid = spec.matrix, math.ceil(math.sqrt(spec.n_slices))
    size = grid * n
    row, col = _orientation(spec.kind)
    normal = _cross(row, col)
    first = _slice_position(spec, row, col, 0)
    shift = (size - n) / 2 * spec.voxel_mm
    position = tuple(p - shift * r - shift * c for p, r, c in zip(first, row, col))
    slice_ms = [1000.0 * _acquisition_offset_s(spec, recipe, tr_ms, 0, k) for k in range(spec.n_slices)]
    ds.ImageType = [*ds.ImageType, "MOSAIC"]
    ds.Rows = ds.Columns = size
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(_dot(first, normal))
    mr = ds.private_block(0x0019, "SIEMENS MR HEADER")
    mr.add_new(0x0A, "US", spec.n_slices)  # NumberOfImagesInMosaic
    mr.add_new(0x29, "FD", slice_ms)  # MosaicRefAcqTimes
    encoder = _SeriesEncoder(ds)
    blank = bytes(2 * n)
    for volume in range(spec.n_volumes):
        slices = [_pixels(ctx, spec, ds.SeriesInstanceUID, volume, 0, k) for k in range(spec.n_slices)]
        rows = []
        for tile_row in range(grid):
            for y in range(n):
                for tile_col in range(grid):
                    k = tile_row * grid + tile_col
                    rows.append(slices[k][2 * n * y:2 * n * (y + 1)] if k < spec.n_slices else blank)
        t_s = start_s + volume * tr_ms / 1000.0
        ds.SOPInstanceUID = ctx.uid("sop", ds.SeriesInstanceUID, volume + 1)
        ds.InstanceNumber = ds.AcquisitionNumber = volume + 1
        ds.AcquisitionTime = ds.ContentTime = _tm(t_s)
        ds[0x0029, 0x1010].value = _csa2(_image_csa(spec, recipe, ds, normal, 0, t_s - start_s, 0, None,
                                                    mosaic=slice_ms))
        ds.PixelData = b"".join(rows)
        yield f"{volume + 1}.dcm", encoder.encode()


def _series_template(ctx: _Session, spec: SeriesSpec, recipe: _Recipe, number: int, tr_ms: float,
                     echo_times: tuple[float, ...], start_s: float, shim: tuple[int, ...]) -> Dataset:
    """Everything that is the same for all files of a series; per-file fields come later."""
    person = _rng(ctx.seed, ctx.subject, "person")
    ds = Dataset()

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(recipe.image_type)
    ds.InstanceCreationDate = ctx.study_date
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ctx.study_date
    ds.StudyTime = _tm(SESSION_START_S)
    ds.SeriesTime = _tm(start_s)
    ds.AcquisitionTime = ds.ContentTime = _tm(start_s)
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "Synthetic Imaging Center"
    ds.InstitutionAddress = "1 Example Street, Springfield"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTHMR01"
    ds.StudyDescription = "Reconcile^Synthetic"
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = "Prisma_fit"
    ds.PatientName = ctx.subject
    ds.PatientID = ctx.subject
    ds.PatientBirthDate = ""
    ds.PatientSex = person.choice("FM")
    ds.PatientAge = f"{person.randrange(20, 60):03d}Y"
    ds.PatientSize = _ds(round(person.uniform(1.55, 1.95), 2))
    ds.PatientWeight = _ds(person.randrange(50, 100))

    ds.ScanningSequence = recipe.scanning_sequence
    ds.SequenceVariant = recipe.sequence_variant
    ds.ScanOptions = recipe.scan_options
    ds.MRAcquisitionType = recipe.acquisition_type
    ds.SequenceName = recipe.sequence_name
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(spec.voxel_mm)
    ds.RepetitionTime = _ds(tr_ms)
    ds.EchoTime = _ds(echo_times[0])
    if recipe.inversion_ms is not None:
        ds.InversionTime = _ds(recipe.inversion_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.253518"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = _ds(spec.voxel_mm)
    ds.NumberOfPhaseEncodingSteps = spec.matrix
    ds.EchoTrainLength = spec.matrix if recipe.epi else 1
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = _ds(recipe.pixel_bandwidth)
    ds.DeviceSerialNumber = "166000"
    ds.SoftwareVersions = "syngo MR E11"
    ds.ProtocolName = spec.description
    ds.ReceiveCoilName = "HeadNeck_20"
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = [0, spec.matrix, spec.matrix, 0]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = _ds(recipe.flip_angle)
    ds.VariableFlipAngleFlag = "N"
    ds.SAR = "0.0123"
    ds.dBdt = "0"
    ds.PatientPosition = "HFS"

    ds.StudyInstanceUID = ctx.uid("study")
    ds.SeriesInstanceUID = ctx.uid("series", number, spec.description)
    ds.StudyID = "1"
    ds.SeriesNumber = number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = ctx.uid("frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.matrix
    ds.PixelSpacing = [_ds(spec.voxel_mm), _ds(spec.voxel_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    if spec.kind == "fmap_phase":
        # VE11 phase images: stored 0..4095, real value = 2*stored - 4096.
        ds.RescaleIntercept = "-4096"
        ds.RescaleSlope = "2"
        ds.RescaleType = "US"

    mr = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    mr.add_new(0x08, "CS", "IMAGE NUM 4")
    mr.add_new(0x09, "LO", "1.0")
    mr.add_new(0x0B, "DS", _ds(_slice_duration_ms(spec, recipe, tr_ms)))
    mr.add_new(0x0F, "SH", "Fast")
    mr.add_new(0x11, "SH", "No")
    mr.add_new(0x12, "SL", [0, 0, 0])
    mr.add_new(0x13, "SL", [0, 0, 0])
    mr.add_new(0x14, "IS", ["0", "0", "0"])
    mr.add_new(0x15, "FD", [0.0, 0.0, 0.0])
    mr.add_new(0x17, "DS", "1")
    mr.add_new(0x18, "IS", "3000")
    if recipe.epi:
        mr.add_new(0x28, "FD", _phase_bandwidth(spec))
    mr.add_new(0x9C, "LO", recipe.sequence_name)

    csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x09, "LO", "20100114")
    csa.add_new(0x10, "OB", b"")
    csa.add_new(0x18, "CS", "MR")
    csa.add_new(0x19, "LO", "20100114")
    csa.add_new(0x20, "OB", _csa2(_series_csa(spec, recipe, tr_ms, echo_times, shim)))
    mi = ds.private_block(0x0051, "SIEMENS MR HEADER", create=True)
    mi.add_new(0x08, "CS", "IMAGE NUM 4")
    mi.add_new(0x09, "LO", "1.0")
    mi.add_new(0x0B, "SH", f"{spec.matrix}p*{spec.matrix}")
    fov = spec.matrix * spec.voxel_mm
    mi.add_new(0x0C, "LO", f"FoV {fov:g}*{fov:g}")
    mi.add_new(0x0F, "LO", "HC1-7")
    mi.add_new(0x11, "LO", "p2" if recipe.epi else "")
    mi.add_new(0x13, "SH", "+LPH")
    mi.add_new(0x17, "SH", f"{spec.voxel_mm:g}mm")
    mi.add_new(0x19, "LO", "A1/PFP" if spec.kind == "dwi" else "A1")

    ds.PixelData = b""
    ds[0x7FE0, 0x0010].VR = "OW"
    return ds


# Elements that differ between the files of one series; the rest is encoded once.
_PER_FILE_TAGS = tuple(int(Tag(t)) for t in (
    (0x0008, 0x0018), (0x0008, 0x0032), (0x0008, 0x0033), (0x0018, 0x0024), (0x0018, 0x0081),
    (0x0018, 0x0086), (0x0019, 0x100C), (0x0019, 0x100D), (0x0019, 0x100E), (0x0019, 0x1027),
    (0x0020, 0x0012), (0x0020, 0x0013), (0x0020, 0x0032), (0x0020, 0x0037), (0x0020, 0x1041),
    (0x0029, 0x1010), (0x7FE0, 0x0010),
))
_PREAMBLE = b"\0" * 128 + b"DICM"


class _SeriesEncoder:
    """Writes a series' files as pydicom's dcmwrite would, re-encoding only per-file elements.

    Encoding every element of every file with pydicom costs ~5 ms a file; this keeps a
    session well under a second.
    """

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds
        self._elements = {int(elem.tag): _encode_element(elem) for elem in ds}
        self._meta_head = _encode_element(DataElement(0x00020001, "OB", b"\0\1")) + _encode_element(
            DataElement(0x00020002, "UI", MR_IMAGE_STORAGE))
        self._meta_tail = b"".join(_encode_element(DataElement(tag, vr, value)) for tag, vr, value in (
            (0x00020010, "UI", ExplicitVRLittleEndian),
            (0x00020012, "UI", IMPLEMENTATION_UID),
            (0x00020013, "SH", IMPLEMENTATION_VERSION),
        ))

    def encode(self) -> bytes:
        ds = self._ds
        for tag in _PER_FILE_TAGS:
            elem = ds.get(tag)
            if elem is not None:
                self._elements[tag] = _encode_element(elem)
            else:
                self._elements.pop(tag, None)
        meta = self._meta_head + _encode_element(DataElement(0x00020003, "UI", ds.SOPInstanceUID)) + self._meta_tail
        group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(meta))
        body = b"".join(self._elements[tag] for tag in sorted(self._elements))
        return _PREAMBLE + group_length + meta + body


def _encode_element(elem: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem)
    return fp.getvalue()


# --------------------------------------------------------------------------------------
# geometry and timing


def _orientation(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return _SAGITTAL if kind == "anat" else _AXIAL


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _slice_position(spec: SeriesSpec, row: Sequence[float], col: Sequence[float], slice_: float) -> tuple[float, ...]:
    """Patient position of the first voxel of a slice, with the stack centred on isocentre."""
    normal = _cross(row, col)
    half_inplane = (spec.matrix - 1) / 2 * spec.voxel_mm
    offset = (slice_ - (spec.n_slices - 1) / 2) * spec.voxel_mm
    return tuple(round(-half_inplane * r - half_inplane * c + offset * n, 4) for r, c, n in zip(row, col, normal))


def _slice_duration_ms(spec: SeriesSpec, recipe: _Recipe, tr_ms: float) -> float:
    return tr_ms / spec.n_slices if recipe.epi else tr_ms


def _acquisition_offset_s(spec: SeriesSpec, recipe: _Recipe, tr_ms: float, volume: int, slice_: int) -> float:
    if recipe.acquisition_type == "3D" or spec.kind == "scout":
        return 0.0
    # Ascending single-band slices, one TR per volume: dcm2niix derives SliceTiming from
    # these times, and reads equal times as a multiband factor.
    return (volume * tr_ms + slice_ * tr_ms / spec.n_slices) / 1000.0


def _phase_bandwidth(spec: SeriesSpec) -> float:
    # 0.5 ms echo spacing across the phase-encoding lines, as a realistic EPI would have.
    return round(1000.0 / (0.5 * spec.matrix), 3)


def _session_shim(ctx: _Session) -> tuple[int, ...]:
    # One shim per session: dcm2niix only writes ShimSetting when lOffsetX != 0, and ReproIn
    # matches field maps to runs by it (without it, xnat2bids' wrapper matches by volume only).
    rng = _rng(ctx.seed, ctx.subject, ctx.session, "shim")
    offsets = tuple(rng.choice((-1, 1)) * rng.randrange(500, 5000) for _ in range(3))
    currents = tuple(rng.randrange(-800, 800) or 1 for _ in range(5))
    return offsets + currents


# --------------------------------------------------------------------------------------
# Siemens CSA headers


CsaElement = tuple[str, str, Sequence[str]]


def _csa2(elements: Sequence[CsaElement]) -> bytes:
    """Encode a CSA2 ("SV10") header as Siemens writes it.

    Valued elements carry at least 6 items (empty padding items after the values):
    dcm2niix reads some elements with a fixed item count and runs off the end otherwise.
    """
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(elements), 77)]
    for name, vr, values in elements:
        n_items = max(6, len(values)) if values else 0
        out.append(struct.pack("<64si4s3i", name.encode("ascii"), len(values), vr.encode("ascii"),
                               _SYNGODT.get(vr, 0), n_items, 77 if values else 205))
        for index in range(n_items):
            data = values[index].encode("latin-1") + b"\0" if index < len(values) else b""
            out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
            out.append(data + b"\0" * (-len(data) % 4))
    return b"".join(out)


def _csa_float(value: float) -> str:
    return f"{value:.8f}"


def _image_csa(spec: SeriesSpec, recipe: _Recipe, ds: Dataset, normal: Sequence[float], slice_: int,
               time_after_start_s: float, bvalue: int, direction: Sequence[float] | None,
               *, mosaic: Sequence[float] = ()) -> list[CsaElement]:
    # A subset of the ~100 elements a scanner writes: the ones dcm2niix and nibabel read,
    # plus a few for realism (every valued element costs ~150 bytes per file).
    values: dict[str, tuple[str, list[str]]] = {
        "ICE_Dims": ("LO", []),
        "B_value": ("IS", [str(bvalue)] if spec.kind == "dwi" else []),
        "ProtocolSliceNumber": ("IS", [str(slice_)]),
        "SliceMeasurementDuration": ("DS", [_csa_float(_slice_duration_ms(spec, recipe, float(ds.RepetitionTime)))]),
        "AcquisitionMatrixText": ("SH", [f"{spec.matrix}p*{spec.matrix}"]),
        "PhaseEncodingDirectionPositive": ("IS", ["1"]),
        "NumberOfImagesInMosaic": ("US", [str(len(mosaic))] if mosaic else []),
        "DiffusionGradientDirection": ("FD", [_csa_float(v) for v in direction] if direction else []),
        "SliceNormalVector": ("FD", [_csa_float(v) for v in normal]),
        "DiffusionDirectionality": ("CS", ["DIRECTIONAL" if direction else "NONE"] if spec.kind == "dwi" else []),
        "TimeAfterStart": ("DS", [_csa_float(time_after_start_s)]),
        "BandwidthPerPixelPhaseEncode": ("FD", [_csa_float(_phase_bandwidth(spec))] if recipe.epi else []),
        "ImaCoilString": ("LO", ["HC1-7"]),
    }
    if mosaic:
        values["MosaicRefAcqTimes"] = ("FD", [_csa_float(t) for t in mosaic])
    if spec.kind == "dwi" and direction:
        g = direction
        matrix = (g[0] * g[0], g[0] * g[1], g[0] * g[2], g[1] * g[1], g[1] * g[2], g[2] * g[2])
        values["B_matrix"] = ("FD", [_csa_float(bvalue * m) for m in matrix])
    return [(name, vr, items) for name, (vr, items) in values.items()]


def _series_csa(spec: SeriesSpec, recipe: _Recipe, tr_ms: float, echo_times: tuple[float, ...],
                shim: tuple[int, ...]) -> list[CsaElement]:
    # Only what readers look at, plus the identifying strings; the protocol carries the rest.
    return [
        ("UsedPatientWeight", "IS", ["70"]),
        ("SequenceFileOwner", "SH", ["SIEMENS"]),
        ("CoilForGradient2", "SH", ["AS82"]),
        ("PositivePCSDirections", "SH", ["+LPH"]),
        ("CoilString", "LO", ["HC1-7"]),
        ("PATModeText", "LO", ["p2" if recipe.epi else "Off"]),
        ("MrPhoenixProtocol", "UN", [_ascconv(spec, recipe, tr_ms, echo_times, shim)]),
        ("PhoenixZIP", "UN", []),
    ]


def _ascconv(spec: SeriesSpec, recipe: _Recipe, tr_ms: float, echo_times: tuple[float, ...],
             shim: tuple[int, ...]) -> str:
    """The MrPhoenixProtocol text: dcm2niix takes EchoTime1/2 and ShimSetting from here."""
    fov = spec.matrix * spec.voxel_mm
    contrasts = len(echo_times) if spec.kind.startswith("fmap") else spec.n_echoes
    lines = [
        ("ulVersion", "0x14b44b6"),
        ("tSequenceFileName", f'""{recipe.sequence_file}""'),
        ("tProtocolName", f'""{spec.description}""'),
        ("sProtConsistencyInfo.tBaselineString", '""N4_VE11C_LATEST_20160120""'),
        ("sProtConsistencyInfo.flNominalB0", "2.89362"),
        ("sProtConsistencyInfo.flGMax", "26"),
        ("sProtConsistencyInfo.flRiseTime", "5.3"),
        ("sGRADSPEC.asGPAData[0].lOffsetX", str(shim[0])),
        ("sGRADSPEC.asGPAData[0].lOffsetY", str(shim[1])),
        ("sGRADSPEC.asGPAData[0].lOffsetZ", str(shim[2])),
        *((f"sGRADSPEC.alShimCurrent[{i}]", str(v)) for i, v in enumerate(shim[3:])),
        ("sGRADSPEC.ucMode", "0x11"),
        ("sTXSPEC.asNucleusInfo[0].tNucleus", '""1H""'),
        ("sTXSPEC.asNucleusInfo[0].lFrequency", "123253518"),
        ("sTXSPEC.asNucleusInfo[0].flReferenceAmplitude", "300.5"),
        ("sRXSPEC.alDwellTime[0]", "2600"),
        ("sSliceArray.asSlice[0].dThickness", f"{spec.voxel_mm:g}"),
        ("sSliceArray.asSlice[0].dPhaseFOV", f"{fov:g}"),
        ("sSliceArray.asSlice[0].dReadoutFOV", f"{fov:g}"),
        ("sSliceArray.lSize", str(1 if recipe.acquisition_type == "3D" else spec.n_slices)),
        ("sSliceArray.ucMode", "0x1"),  # ascending
        ("sKSpace.lBaseResolution", str(spec.matrix)),
        ("sKSpace.lPhaseEncodingLines", str(spec.matrix)),
        ("sKSpace.lPartitions", str(spec.n_slices if recipe.acquisition_type == "3D" else 1)),
        ("sKSpace.ucDimension", "0x4" if recipe.acquisition_type == "3D" else "0x2"),
        ("sKSpace.ucPhasePartialFourier", "0x10"),
        ("sKSpace.ucSlicePartialFourier", "0x10"),
        ("sFastImaging.lEPIFactor", str(spec.matrix if recipe.epi else 1)),
        ("sFastImaging.lTurboFactor", "1"),
        ("sPat.lAccelFactPE", "1"),
        ("sPat.lAccelFact3D", "1"),
        ("sPat.ucPATMode", "0x1"),
        ("lContrasts", str(contrasts)),
        ("alTR[0]", str(round(tr_ms * 1000))),
        *((f"alTE[{i}]", str(round(te * 1000))) for i, te in enumerate(echo_times)),
        ("lRepetitions", str(spec.n_volumes - 1)),
        ("lAverages", "1"),
        ("adFlipAngleDegree[0]", f"{recipe.flip_angle:g}"),
    ]
    if recipe.inversion_ms is not None:
        lines.append(("alTI[0]", str(round(recipe.inversion_ms * 1000))))
    if spec.kind == "dwi":
        lines += [
            ("sDiffusion.lDiffWeightings", "2"),
            ("sDiffusion.alBValue[1]", str(spec.b_value)),
            ("sDiffusion.lNoiseLevel", "40"),
            ("sDiffusion.lDiffDirections", str(spec.n_volumes - 1)),
            ("sDiffusion.ulMode", "0x100"),
        ]
    body = "\n".join(f"{key} = {value}" for key, value in lines)
    return (
        "### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=51130001 "
        "converter=%MEASCONST%/ConverterList/Prot_Converter.txt ###\n"
        f"{body}\n### ASCCONV END ###"
    )


def _set_diffusion(ds: Dataset, bvalue: int, direction: Sequence[float] | None) -> None:
    # (0019,10xx) belongs to the "SIEMENS MR HEADER" block reserved at (0019,0010).
    ds.add_new(0x0019100C, "IS", str(bvalue))
    ds.add_new(0x0019100D, "CS", "DIRECTIONAL" if direction else "NONE")
    if direction:
        g = direction
        ds.add_new(0x0019100E, "FD", [float(v) for v in g])
        ds.add_new(0x00191027, "FD", [bvalue * m for m in (g[0] * g[0], g[0] * g[1], g[0] * g[2],
                                                            g[1] * g[1], g[1] * g[2], g[2] * g[2])])
    else:
        for tag in (0x0019100E, 0x00191027):
            if tag in ds:
                del ds[tag]


# --------------------------------------------------------------------------------------
# pixel data


def _pixels(ctx: _Session, spec: SeriesSpec, series_uid: str, volume: int, echo: int, slice_: int) -> bytes:
    """A noisy ellipse whose contrast depends on the kind, echo and slice; 12-bit unsigned."""
    rng = _rng(series_uid, volume, echo, slice_)
    n = spec.matrix
    noise = rng.randbytes(n * n)
    if spec.kind == "fmap_phase":
        values = [(b << 4) | (b & 0xF) for b in noise]  # uniform over 0..4095
        return struct.pack(f"<{n * n}H", *values)
    base = {"anat": 900, "func": 1200, "fmap_mag": 1500, "dwi": 1000, "scout": 600}[spec.kind]
    base = base * math.exp(-0.15 * echo) * (1.0 - 0.04 * abs(slice_ - spec.n_slices / 2))
    if spec.kind == "dwi" and volume > 0:
        base *= 0.35
    inside, outside = base, 20.0
    scale_in, scale_out = (0.05 * inside + 8.0) / 128.0, (0.05 * outside + 8.0) / 128.0
    values = [
        max(0, min(4095, int(inside + (b - 128) * scale_in) if m else int(outside + (b - 128) * scale_out)))
        for m, b in zip(_ellipse_mask(n), noise)
    ]
    return struct.pack(f"<{n * n}H", *values)


@lru_cache(maxsize=8)
def _ellipse_mask(n: int) -> tuple[bool, ...]:
    centre = (n - 1) / 2
    return tuple(
        ((x - centre) / (0.42 * n)) ** 2 + ((y - centre) / (0.48 * n)) ** 2 <= 1.0
        for y in range(n)
        for x in range(n)
    )


# --------------------------------------------------------------------------------------
# value formatting


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters, no exponent for ordinary values)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _tm(seconds: float) -> str:
    micro = round(seconds * 1_000_000) % (24 * 3600 * 1_000_000)
    hours, rest = divmod(micro, 3600 * 1_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000)
    secs, micros = divmod(rest, 1_000_000)
    return f"{hours:02d}{minutes:02d}{secs:02d}.{micros:06d}"
