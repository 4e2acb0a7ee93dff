"""Shared fixtures: the official reference data copied from ../shared/reference."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton attention kernel runs in Triton's CPU interpreter, so that its tests
# (tests/test_fused_attention.py) run everywhere; set before rmt's kernel is defined. On a GPU
# the tests run the compiled kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def exact_fp32():
    """fp32 means fp32: no TF32 in CUDA matmuls or convs during a check against fp32 numbers
    (the bench's own fp32 setting; imported here, after TRITON_INTERPRET is settled)."""
    from rmt.bench.runner import precision

    with precision(torch.device("cuda"), "fp32"):
        yield


@pytest.fixture(scope="session")
def schema() -> dict:
    """Official constructor config, parameter count and state-dict layout of all seven variants."""
    return json.loads((DATA / "official_schema.json").read_text())


@pytest.fixture(scope="session")
def official_mini() -> dict:
    """Two small official configurations with weights, inputs and the official logits."""
    return torch.load(DATA / "official_mini.pt", weights_only=False)


def official_state_dict(schema_entry: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the official layout of one variant (every key and shape, random values)."""
    g = torch.Generator().manual_seed(seed)
    cfg = schema_entry["config"]
    out = {}
    for key, shape in schema_entry["state_dict"]:
        if ".Relpos." in key:  # buffers the official code derives from its configuration
            stage = int(key.split(".")[1])
            heads = cfg["num_heads"][stage]
            if key.endswith("angle"):
                angle = 1.0 / (10000 ** torch.linspace(0, 1, cfg["embed_dims"][stage] // heads // 2))
                out[key] = angle.unsqueeze(-1).repeat(1, 2).flatten()
            else:
                init, spread = cfg["init_values"][stage], cfg["heads_ranges"][stage]
                out[key] = torch.log(1 - 2 ** (-init - spread * torch.arange(heads, dtype=torch.float) / heads))
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def cuda_available() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- evaluation helpers
# A model whose predictions are known: timm's `test_resnet` with crafted weights that pass the
# mean red value of the image through every layer unchanged and score the ten CODE_CLASSES by
# closeness to their code colours. Ten code colours, 24 red levels apart, stand for ten classes;
# images are drawn 6 levels above their code so the ranking is unambiguous:
# the code itself, the next code up, the one below, two up, two below.

CODE_CLASSES = (0, 1, 65, 100, 207, 340, 472, 600, 817, 999)
CODE_STEP, CODE_OFFSET = 24, 6


def code_red(code: int) -> int:
    """The red value drawn into an image of code colour ``code`` (0..9)."""
    return 20 + CODE_STEP * code + CODE_OFFSET


def code_ranking(red: int) -> list[int]:
    """The five classes the colour-code model ranks first for an image of this red value."""
    centres = [20 + CODE_STEP * k for k in range(len(CODE_CLASSES))]
    order = sorted(range(len(CODE_CLASSES)), key=lambda k: abs(red - centres[k]))
    return [CODE_CLASSES[k] for k in order[:5]]


def colour_code_state_dict() -> dict[str, torch.Tensor]:
    """Weights for timm's ``test_resnet`` that make it the colour-code classifier described above."""
    import timm

    model = timm.create_model("test_resnet")
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    shift = 2.0  # normalized inputs are in [-1, 1]: shifted positive, every ReLU passes them
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("running_var"):
            value.fill_(1.0 - 1e-5)  # (x - 0) / sqrt(var + eps) = x exactly
        elif key.endswith(".weight") and value.ndim == 1:  # batch-norm scale
            residual_end = module.endswith(("layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn3", "layer4.0.bn2"))
            value.fill_(0.0 if residual_end else 1.0)  # residual branches add zero
        elif key.endswith(".weight") and value.ndim == 4 and (module.startswith("conv1.") or "downsample" in module):
            centre = value.shape[-1] // 2
            for c in range(3):
                value[c, c, centre, centre] = 1.0
    state["conv1.1.bias"][:3] = shift
    centres = torch.tensor([(20 + CODE_STEP * k) / 255 * 2 - 1 + shift for k in range(len(CODE_CLASSES))])
    scale = 100.0
    state["fc.bias"].fill_(-1e4)
    for k, cls in enumerate(CODE_CLASSES):  # -scale * (m - c)^2 up to the common -scale * m^2
        state["fc.weight"][cls, 0] = 2 * scale * centres[k]
        state["fc.bias"][cls] = -scale * centres[k] ** 2
    return state


def write_code_image(path, red: int, size=(64, 48), mode: str = "RGB", fmt: str = "JPEG") -> None:
    """A solid image of the given red value (green and blue mid-grey) in any PIL mode and format."""
    from PIL import Image

    image = Image.new("RGB", size, (red, 128, 128))
    if mode == "L":
        image = Image.new("L", size, red)
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


# (validation image number, class index, code colour drawn, PIL mode, file format): 13 images, an
# odd count, with every input ImageNet really has (grayscale, CMYK, PNG data in a .JPEG file)
TINY_VAL = (
    (3, 0, 0, "RGB", "JPEG"),
    (8, 1, 1, "L", "JPEG"),
    (15, 65, 2, "CMYK", "JPEG"),
    (16, 100, 3, "RGB", "PNG"),
    (23, 207, 3, "RGB", "JPEG"),
    (42, 340, 6, "RGB", "JPEG"),
    (108, 999, 0, "L", "JPEG"),
    (250, 600, 7, "RGB", "JPEG"),
    (777, 817, 9, "CMYK", "JPEG"),
    (1000, 472, 6, "RGB", "JPEG"),
    (4096, 5, 4, "RGB", "JPEG"),
    (31337, 999, 9, "RGB", "PNG"),
    (50000, 65, 0, "RGB", "JPEG"),
)
TINY_SIZES = ((64, 48), (48, 64), (90, 30), (33, 70))


def tiny_val_expected(entries=TINY_VAL) -> tuple[int, int]:
    """(top-1 correct, top-5 correct) of the colour-code model on these entries, from the colours."""
    rankings = [(target, code_ranking(code_red(code))) for _, target, code, _, _ in entries]
    return sum(r[0] == t for t, r in rankings), sum(t in r for t, r in rankings)


def write_devkit_meta(path, seed: int = 0) -> dict[int, str]:
    """A devkit meta.mat whose ILSVRC2012_IDs are a shuffled order of the wnids (as in the real one),
    with inner WordNet nodes (num_children > 0, ids above 1000) mixed in. Returns id -> wnid."""
    import random

    import numpy as np
    from timm.data import ImageNetInfo

    scipy_io = pytest.importorskip("scipy.io", reason="scipy writes the test devkit's meta.mat")
    order = list(ImageNetInfo().label_names())
    random.Random(seed).shuffle(order)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    rows = [(i + 1, wnid, "w", "g", 0) for i, wnid in enumerate(order)]
    rows += [(1001, "n00001740", "entity", "g", 3), (1002, "n00002137", "abstraction", "g", 5)]
    scipy_io.savemat(str(path), {"synsets": np.array(rows, dtype=fields).reshape(-1, 1)})
    return {i + 1: wnid for i, wnid in enumerate(order)}


def write_val_layouts(root: Path, images: dict[int, Path], targets: dict[int, int], devkit: bool = True) -> dict[str, Path]:
    """Lay out the same validation images (number -> file, number -> class) in every supported layout.

    Images are symbolic links (never copies); each layout's labels file is written the way its
    distributor writes it. Returns {layout: the folder to evaluate}. ``devkit=False`` (or no scipy)
    leaves out the devkit layout.
    """
    import hashlib
    import os

    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    name = {n: f"ILSVRC2012_val_{n:08d}.JPEG" for n in images}
    out = {}

    def link(source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), destination)

    for n, source in images.items():
        link(source, root / "imagefolder" / wnids[targets[n]] / name[n])
        link(source, root / "imagenet-v2" / str(targets[n]) / (hashlib.sha1(str(n).encode()).hexdigest() + ".jpeg"))
        link(source, root / "caffe" / "images" / name[n])
        link(source, root / "kaggle" / name[n])
    # an empty class folder and a stray non-image file, as real copies have
    empty_class = next(i for i in range(1000) if i not in targets.values())
    (root / "imagefolder" / wnids[empty_class]).mkdir()
    (root / "imagefolder" / wnids[targets[min(images)]] / "notes.txt").write_text("not an image")
    out["imagefolder"], out["imagenet-v2"] = root / "imagefolder", root / "imagenet-v2"
    # Caffe val.txt in the parent, listing more images than the folder holds (a subset is fine)
    lines = [f"{name[n]} {targets[n]}" for n in sorted(images)] + ["ILSVRC2012_val_00000002.JPEG 795"]
    (root / "caffe" / "val.txt").write_text("\n".join(lines) + "\n")
    out["flat-caffe"] = root / "caffe" / "images"
    rows = [f"{name[n][:-5]},{wnids[targets[n]]} 10 20 30 40 {wnids[targets[n]]} 1 2 3 4 " for n in sorted(images)]
    (root / "kaggle" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    out["flat-kaggle"] = root / "kaggle"
    if devkit and importlib.util.find_spec("scipy") is not None:
        data = root / "devkit" / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        wnid_to_id = {w: i for i, w in write_devkit_meta(data / "meta.mat").items()}
        ground_truth = [wnid_to_id[wnids[targets[n]]] if n in images else 1 for n in range(1, 50_001)]
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ground_truth))
        for n, source in images.items():
            link(source, root / "devkit" / "val" / name[n])
        out["flat-devkit"] = root / "devkit" / "val"
    return out


@pytest.fixture(scope="session")
def tiny_val(tmp_path_factory) -> dict[str, Path]:
    """TINY_VAL's 13 generated images in every layout: {layout: folder}."""
    root = tmp_path_factory.mktemp("tiny_val")
    images = {}
    for i, (n, _, code, mode, fmt) in enumerate(TINY_VAL):
        images[n] = root / "source" / f"{n}.JPEG"  # PNG entries keep the .JPEG name, as in ImageNet
        images[n].parent.mkdir(exist_ok=True)
        write_code_image(images[n], code_red(code), size=TINY_SIZES[i % len(TINY_SIZES)], mode=mode, fmt=fmt)
    return write_val_layouts(root, images, {n: t for n, t, *_ in TINY_VAL})


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory) -> Path:
    """The colour-code classifier's weights as a plain state dict file for timm's test_resnet."""
    path = tmp_path_factory.mktemp("colour_model") / "test_resnet_colour.pth"
    torch.save(colour_code_state_dict(), path)
    return path


# ----------------------------------------------------------------------------- model zoo: a real HTTP server


class ZooServer:
    """An HTTP server on 127.0.0.1, in a thread, serving ``files`` (path -> bytes) for the zoo tests.

    ``modes[path]`` picks a behaviour: ``ok`` (honours Range and If-Range), ``drop-once`` (the
    first response stops halfway through the body and closes the connection), ``drop`` (every
    response does), ``no-range`` (ignores Range), ``html`` (a 200 text/html page), ``html-as-file``
    (an HTML page sent as application/octet-stream), ``404``, ``500``, ``500-once``, ``slow``
    (sends in small pieces with pauses). ``requests`` records (path, Range, If-Range) of each GET.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []
        self._seen: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                try:
                    server._serve(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes, mode: str = "ok") -> str:
        self.files[path.lstrip("/")] = data
        self.modes[path.lstrip("/")] = mode
        return self.url(path)

    def gets(self, path: str) -> list[tuple[str, str | None, str | None]]:
        return [r for r in self.requests if r[0] == path.lstrip("/")]

    @staticmethod
    def etag(data: bytes) -> str:
        import hashlib

        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'

    def _serve(self, handler) -> None:
        import socket
        import time

        path = handler.path.lstrip("/")
        rng, if_range = handler.headers.get("Range"), handler.headers.get("If-Range")
        self.requests.append((path, rng, if_range))
        count = self._seen[path] = self._seen.get(path, 0) + 1
        mode = self.modes.get(path, "ok")
        if path not in self.files or mode == "404":
            handler.send_error(404, "Not Found")
            return
        if mode == "500" or (mode == "500-once" and count == 1):
            handler.send_error(500, "Internal Server Error")
            return
        data = self.files[path]
        if mode == "html":
            page = b"<!DOCTYPE html><html><head><title>share</title></head><body>log in</body></html>"
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            handler.wfile.write(page)
            return
        if mode == "html-as-file":
            data = b"\n  <html><body>Baidu: please log in</body></html>" + b" " * 4096
        start = 0
        resumable = rng and rng.startswith("bytes=") and mode != "no-range"
        if resumable and if_range and if_range != self.etag(data):
            resumable = False  # the file changed: send it whole
        if resumable:
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                handler.send_error(416, "Range Not Satisfiable")
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("ETag", self.etag(data))
        handler.end_headers()
        if mode == "drop" or (mode == "drop-once" and count == 1):
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)  # the connection breaks mid-transfer
            return
        if mode == "slow":
            piece = max(len(body) // 30, 1)  # about 1.5 s in all: long enough for others to queue
            for i in range(0, len(body), piece):
                handler.wfile.write(body[i:i + piece])
                time.sleep(0.05)
            return
        handler.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def zoo_server():
    server = ZooServer()
    yield server
    server.close()


@pytest.fixture
def zoo_home(tmp_path, monkeypatch):
    """An empty weights cache (RMT_HOME) and an environment without mirrors, offline mode or overrides."""
    home = tmp_path / "rmt-home"
    monkeypatch.setenv("RMT_HOME", str(home))
    for variable in ("RMT_ZOO_MIRROR", "RMT_OFFLINE", "RMT_ZOO_FILE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    # quick retries: a test must not wait for real backoff
    monkeypatch.setenv("RMT_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("RMT_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("RMT_DOWNLOAD_TIMEOUT", "10")
    return home


@pytest.fixture(scope="session")
def rmt_t_checkpoint_bytes(schema) -> bytes:
    """An official-layout RMT-T training checkpoint (``model`` and a different ``model_ema``), as bytes."""
    import io

    plain = official_state_dict(schema["rmt_t"], seed=1)
    ema = {k: (v + 1 if v.is_floating_point() and ".Relpos." not in k else v) for k, v in plain.items()}
    buffer = io.BytesIO()
    torch.save({"model": plain, "model_ema": ema, "epoch": 299}, buffer)
    return buffer.getvalue()


def run_rmt(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run ``rmt ARGS`` in this process through the real entry point: (exit code, stdout, stderr)."""
    import sys

    from rmt_cli.main import main

    monkeypatch.setattr(sys, "argv", ["rmt", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width; keep lines whole
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
