"""edpairs._io's output checks: a missing folder named, a file in a folder's place named as a
file, a folder that takes no files refused (by creating and removing a file there), nothing left
behind."""

from __future__ import annotations

import os
import sys

import pytest

from edpairs._io import check_can_create_in, check_output_file, check_output_folder, existing_folder


def _bound_by_permissions() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() != 0  # (root: permissions do not bind)


def test_missing_folder_and_file_in_the_way(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match=r"its folder .*nodir.sub does not exist \(create it first\)"):
        check_output_file(tmp_path / "nodir" / "sub" / "p.npz", "the pairs file")
    with pytest.raises(NotADirectoryError, match=r"notes\.txt is a file, not a folder"):
        check_output_file(tmp_path / "notes.txt" / "p.npz", "the pairs file")
    with pytest.raises(NotADirectoryError, match=r"notes\.txt is a file, not a folder"):
        existing_folder(str(tmp_path / "notes.txt" / "deeper" / "p.npz"), "cannot write")
    with pytest.raises(NotADirectoryError, match=r"'.*notes\.txt' is a file, not a folder: name a folder"):
        check_output_folder(tmp_path / "notes.txt", "--store", written_inside=True)
    with pytest.raises(FileNotFoundError, match=r"its folder .*nodir does not exist"):
        check_output_folder(tmp_path / "nodir" / "rep", "--out", written_inside=False)
    assert not os.path.exists(tmp_path / "nodir")


def test_a_folder_that_takes_files_passes_and_keeps_nothing(tmp_path):
    assert check_output_file(tmp_path / "p.npz", "the pairs file") == str(tmp_path)
    (tmp_path / "store").mkdir()
    check_output_folder(tmp_path / "store", "--store", written_inside=True)
    check_output_folder(tmp_path / "new", "--out", written_inside=False)
    assert sorted(os.listdir(tmp_path)) == ["store"] and os.listdir(tmp_path / "store") == []


@pytest.mark.skipif(not _bound_by_permissions(), reason="root: folder permissions do not bind")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=rf"cannot write x: no file can be created in the folder {ro} "):
            check_can_create_in(str(ro), "x")
        with pytest.raises(PermissionError, match="no file can be created"):
            check_output_file(ro / "p.npz", "the pairs file")
        # A store filled in place needs the folder itself; a report is built beside it.
        with pytest.raises(PermissionError, match=f"in the folder {ro} "):
            check_output_folder(ro, "--store", written_inside=True)
        check_output_folder(ro, "--out", written_inside=False)
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc"), reason="Linux /proc")
def test_a_file_system_that_takes_no_files_is_refused_even_to_root():
    with pytest.raises(PermissionError, match=r"cannot write the pairs file '/proc/p.npz': no file can be created "
                                              r"in the folder /proc \("):
        check_output_file("/proc/p.npz", "the pairs file")
