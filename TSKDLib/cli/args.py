"""Argument helpers shared by every ``tskd`` subcommand (``cli``, ``pipeline_cli``, ``benchmark``).

Kept apart from :mod:`TSKDLib.cli.main` so that the subcommand modules do not import the command's
entry point (which imports them): the import graph stays free of cycles.
"""

from __future__ import annotations

from TSKDLib.errors import InputError
from TSKDLib.data.slices import parse_slices

AXIS_HELP = ("slice axis: acquisition (default) = the scan's own slices, the voxel axis the file stacks "
             "(largest spacing; through an oblique direction matrix, exact, no resampling); axial, coronal, "
             "sagittal = perpendicular to the patient axis closest to S, P, L (for near-isotropic volumes)")


def add_axis_argument(parser, default: str | None = "acquisition", help: str = AXIS_HELP) -> None:
    """The same ``--axis`` choice for inspect, train, segment and benchmark."""
    parser.add_argument("--axis", default=default, choices=["acquisition", "axial", "coronal", "sagittal"], help=help)


def parse_slices_arg(spec: str | None, option: str = "--labelled-slices") -> list[int] | None:
    """A slice-range option's value (``"3,7,10-12"``) -> sorted unique indices, None when not
    given (:func:`TSKDLib.data.slices.parse_slices`). Raises :class:`InputError` naming ``option``
    when the text is malformed."""
    if spec is None:
        return None
    try:
        return parse_slices(spec)
    except ValueError as exc:
        raise InputError(f"{option} {spec!r}: {exc}.", fix="Write slice indices like 2,7,12-14.") from None
