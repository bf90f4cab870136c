"""Models in Ollama's local store, read only, and the Modelfile that imports a qedit output into Ollama.

The store, as Ollama lays it out (read from github.com/ollama/ollama):
- Its directory: $OLLAMA_MODELS, trimmed of spaces and quotes (envconfig/config.go: Models(), Var()), else
  ~/.ollama/models; the Linux service install runs Ollama as the user `ollama` whose home is /usr/share/ollama
  (scripts/install.sh, docs/faq.mdx "Where are models stored?"), so /usr/share/ollama/.ollama/models is tried too.
- A name is [host/][namespace/]model[:tag], with defaults registry.ollama.ai, library and latest, and parts of
  letters, digits, '_', '-' and '.' (types/model/name.go: ParseNameBare, Merge, isValidPart).
- Its manifest is manifests/HOST/NAMESPACE/MODEL/TAG (types/model/name.go: Filepath; manifest/paths.go:
  PathForName): JSON with `layers`, each {mediaType, digest "sha256:HEX", size} (manifest/manifest.go,
  manifest/layer.go). A layer's blob is blobs/sha256-HEX (manifest/paths.go: BlobsPath).
- Layer media types application/vnd.ollama.image.{model, template (or the older prompt), system, params (a JSON
  object; a list value is one PARAMETER line per item), adapter, projector, license} (server/images.go: GetModel).
- A Modelfile's values are bare, "quoted" or \"\"\"triple quoted\"\"\"; a bare value ends at the first space
  (parser/parser.go: quote, unquote, parseRuneForState); `#` starts a comment; a relative FROM or ADAPTER path is
  relative to the Modelfile's directory.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qedit.core.errors import QeditError

PREFIX = "ollama:"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MEDIA = "application/vnd.ollama.image."
SERVICE_STORE = Path("/usr/share/ollama/.ollama/models")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
HEADER = "# Modelfile written by qedit for "


@dataclass(frozen=True)
class OllamaModel:
    """One model of the store: its GGUF blob and what its Modelfile set."""

    name: str                                   # as `ollama list` shows it, without the tag: llama3.2, user/model
    tag: str
    store: Path                                 # the models directory
    gguf: Path                                  # the model layer's blob
    template: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None
    adapters: tuple[Path, ...] = ()
    projectors: tuple[Path, ...] = ()
    licenses: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


def is_ref(text: str) -> bool:
    return str(text).startswith(PREFIX)


def store_dirs() -> list[Path]:
    """Where Ollama keeps its models: $OLLAMA_MODELS, else the per-user and the Linux service directories."""
    env = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    if env:
        return [Path(env)]
    dirs = [Path.home() / ".ollama" / "models"]
    if sys.platform.startswith("linux"):
        dirs.append(SERVICE_STORE)
    return dirs


def parse_name(ref: str) -> tuple[str, str, str, str]:
    """ollama:[host/][namespace/]model[:tag] -> (host, namespace, model, tag), with Ollama's defaults."""
    text = ref[len(PREFIX):] if is_ref(ref) else ref
    rest, tag = text, DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = rest.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) > 3 or not all(parts) or not tag:
        raise QeditError(f"{ref}: not an Ollama model name; give ollama:NAME[:TAG], e.g. ollama:llama3.2:1b")
    host, namespace, model = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 3 - len(parts)] + parts
    ok = (_HOST.fullmatch(host) and _NAMESPACE.fullmatch(namespace) and _PART.fullmatch(model)
          and _PART.fullmatch(tag))
    if not ok:
        raise QeditError(f"{ref}: not an Ollama model name (letters, digits, '_', '-', '.'); "
                         "give ollama:NAME[:TAG], e.g. ollama:llama3.2:1b")
    return host, namespace, model, tag


def display(host: str, namespace: str, model: str) -> str:
    """The name as Ollama shows it: the default host and namespace left out (types/model/name.go)."""
    if host.lower() != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}"
    return model if namespace.lower() == DEFAULT_NAMESPACE else f"{namespace}/{model}"


def manifests(store: Path) -> Iterator[tuple[str, str, Path]]:
    """(name, tag, manifest path) of every model in the store."""
    root = store / "manifests"
    for path in sorted(root.glob("*/*/*/*")):
        if path.is_file():
            host, namespace, model, tag = path.relative_to(root).parts
            yield display(host, namespace, model), tag, path


def resolve(ref: str) -> OllamaModel:
    """The model `ollama:NAME[:TAG]` names in the first store that has it."""
    host, namespace, model, tag = parse_name(ref)
    stores = [s for s in store_dirs() if (s / "manifests").is_dir()]
    if not stores:
        raise QeditError(f"{ref}: no Ollama model store at {' or '.join(map(str, store_dirs()))}; set OLLAMA_MODELS "
                         "to the directory Ollama keeps its models in")
    want = (host.lower(), namespace.lower(), model.lower(), tag.lower())
    for store in stores:
        for path in [store / "manifests" / host / namespace / model / tag, *(p for _, _, p in manifests(store))]:
            parts = path.relative_to(store / "manifests").parts
            if path.is_file() and tuple(p.lower() for p in parts) == want:   # names are case-insensitive
                return _read(ref, store, display(*parts[:3]), parts[3], path)
    have = sorted({f"{n}:{t}" for s in stores for n, t, _ in manifests(s)})
    where = " and ".join(map(str, stores))
    raise QeditError(f"{ref}: not in the Ollama store {where}; it has: {', '.join(have) or 'no models'}")


def as_source(model: str | Path) -> tuple[Path, OllamaModel | None]:
    """A model argument as a path: a path stays one (an existing file wins over a name); ollama:NAME[:TAG] becomes
    the GGUF blob of that model in the store, returned with the model."""
    if not is_ref(str(model)) or Path(model).exists():
        return Path(model), None
    found = resolve(str(model))
    return found.gguf, found


def _read(ref: str, store: Path, name: str, tag: str, manifest: Path) -> OllamaModel:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        by_type: dict[str, list[Path]] = {}
        for layer in layers:
            by_type.setdefault(str(layer["mediaType"]).removeprefix(MEDIA), []).append(blob_path(store, layer["digest"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QeditError(f"{manifest}: unreadable Ollama manifest ({exc})") from exc
    if not by_type.get("model"):
        raise QeditError(f"{ref}: has no GGUF model layer in {manifest} (its weights are stored another way); "
                         "qedit edits GGUF models")
    gguf = by_type["model"][0]
    if not gguf.is_file():
        raise QeditError(f"{ref}: its model blob {gguf} is missing; run `ollama pull {name}:{tag}`")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise QeditError(f"{ref}: its model blob {gguf} is not a GGUF file; qedit edits GGUF models")

    def text(kind: str) -> str | None:
        paths = by_type.get(kind) or by_type.get("prompt" if kind == "template" else "", [])
        return paths[-1].read_text(encoding="utf-8") if paths else None

    try:
        params = json.loads(text("params") or "{}")
        licenses = tuple(p.read_text(encoding="utf-8") for p in by_type.get("license", []))
        template, system = text("template"), text("system")
    except (OSError, ValueError) as exc:
        raise QeditError(f"{ref}: unreadable layer of {manifest} ({exc})") from exc
    if not isinstance(params, dict):
        raise QeditError(f"{ref}: its params layer is not a JSON object")
    return OllamaModel(name, tag, store, gguf, template, params, system, tuple(by_type.get("adapter", [])),
                       tuple(by_type.get("projector", [])), licenses)


def blob_path(store: Path, digest: str) -> Path:
    match = _DIGEST.fullmatch(str(digest))
    if match is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return store / "blobs" / f"sha256-{match.group(1)}"


def blob_label(path: Path) -> str | None:
    """ollama:NAME:TAG of a model blob in a store (its file name says nothing), or None for any other file."""
    if path.parent.name != "blobs" or _DIGEST.fullmatch(path.name) is None:
        return None
    for name, tag, manifest in manifests(path.parent.parent):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        if any(layer.get("mediaType") == MEDIA + "model" and str(layer.get("digest", "")).replace(":", "-") == path.name
               for layer in layers if isinstance(layer, dict)):
            return f"{PREFIX}{name}:{tag}"
    return None


def store_of(path: Path, *extra: Path) -> Path | None:
    """The Ollama store `path` lies in, if any."""
    target = path.resolve()
    for store in [*extra, *store_dirs()]:
        if store.exists() and target.is_relative_to(store.resolve()):
            return store
    return None


def refuse_store_output(path: Path, *extra: Path) -> None:
    """qedit never writes into Ollama's store: an output there is refused."""
    store = store_of(path, *extra)
    if store is not None:
        raise QeditError(f"{path}: is inside the Ollama model store {store}; qedit never writes there: write it "
                         "elsewhere and import it with `ollama create NAME -f Modelfile`")


def quote(value: str) -> str:
    """A Modelfile value as Ollama's parser reads it back (parser/parser.go: quote)."""
    if value and not any(c.isspace() for c in value) and not value.startswith('"'):
        return value
    if '"' not in value:
        return f'"{value}"'
    if '"""' in value:
        raise ValueError('it contains """, which a Modelfile value cannot hold')
    return f'"""{value}"""'


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def modelfile_text(output: str, base: str, *, adapter: str | None = None, model: OllamaModel | None = None,
                   inherits: bool = False) -> tuple[str, list[str]]:
    """The Modelfile: FROM `base` (and `adapter`), with the TEMPLATE, SYSTEM, PARAMETER, LICENSE, projector and
    adapter lines of the Ollama `model` the output came from; `inherits`: `base` is that model (its projectors and
    adapters come with it). Returns the text and notes on what could not be carried over."""
    lines, notes = [f"{HEADER}{output}", f"FROM {quote(base)}"], []
    if model is not None and not inherits:
        lines += [f"FROM {quote(str(p))}" for p in model.projectors]
        lines += [f"ADAPTER {quote(str(p))}" for p in model.adapters]
        if model.adapters:
            notes.append(f"the adapter(s) of ollama:{model.ref} are carried over; the edit was computed without them")
    if adapter is not None:
        lines.append(f"ADAPTER {quote(adapter)}")
    if model is not None:
        texts = [("TEMPLATE", model.template), ("SYSTEM", model.system)] + [("LICENSE", t) for t in model.licenses]
        for key, values in model.params.items():
            texts += [(f"PARAMETER {key}", _param_text(v)) for v in (values if isinstance(values, list) else [values])]
        for command, value in texts:
            if value is None:
                continue
            try:
                lines.append(f'{command} """{value}"""' if command in ("TEMPLATE", "SYSTEM", "LICENSE") and
                             '"""' not in value else f"{command} {quote(value)}")
            except ValueError as exc:
                notes.append(f"{command} of ollama:{model.ref} not carried over: {exc}")
    return "\n".join(lines) + "\n", notes


def model_name(stem: str) -> str:
    """A valid Ollama model name made of an output's file stem."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip(".-")[:80]
    return name or "qedit-model"


def written_by_qedit_for(path: Path, output: str) -> bool:
    """Whether the Modelfile `path` is one qedit wrote for `output` (so writing it again clobbers nothing)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == f"{HEADER}{output}"
    except (OSError, UnicodeDecodeError):
        return False


def candidates(output: Path) -> Sequence[Path]:
    """Where the Modelfile of `output` may go, in order: Modelfile beside it, then OUTPUT.Modelfile, ..."""
    return [output.with_name("Modelfile"), output.with_name(f"{output.name}.Modelfile")] + [
        output.with_name(f"{output.name}.{i}.Modelfile") for i in range(2, 100)]
