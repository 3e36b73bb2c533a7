"""Type stubs of persona's extension module (persona._persona)."""

from os import PathLike
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Union, overload

import numpy as np
import numpy.typing as npt

VERSION: str

def set_cpu_activations(mode: str) -> str:
    """The CPU backend's activations for the whole process: "f32" (default, exact) or "q8"
    (8 bits per 32 values, as llama.cpp, for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights). Returns the
    previous setting."""

class PersonaError(ValueError):
    """An error from persona (bad input, a file it cannot read, a model it cannot run)."""

_Path = Union[str, "PathLike[str]"]
Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int]]
# A batch: a list of prompts (each may have its own plan: steer/monitor as one list per prompt).
Prompts = Sequence[Prompt]
# A steering op: {"vector": name | path | Vector | array, "layers": 12 | "10-14" | "all" | [12, 13],
#  "coeff": 4.0, "op": "add" | "ablate" | "clamp" | "center", "positions": "all" | "prompt" | "response",
#  "when": "evil:gt:3.5", "scale": "raw" | "relative", "origin": "zero" | "baseline"}
SteerOp = Mapping[str, Any]
# A monitor: {"vector": ..., "layers": ..., "name": str, "threshold": float}, or just a name / Vector.
MonitorItem = Union[str, "Vector", Mapping[str, Any]]
Steer = Union[Sequence[SteerOp], SteerOp]
Monitor = Union[Sequence[MonitorItem], MonitorItem]

class Vector:
    """A persona vector: one direction per residual index 0..=N, float32 [N+1, hidden].

    Example:
        >>> v = persona.Vector.load("vectors/smollm2-135m-instruct/evil.safetensors")
        >>> v.to_numpy().shape
        (31, 576)
    """

    @staticmethod
    def load(path: _Path) -> Vector:
        """Read a persona safetensors vector or a llama.cpp control vector (GGUF).

        Example:
            >>> v = persona.Vector.load("evil.safetensors")
        """
    def save(self, path: _Path) -> None:
        """Write persona safetensors, atomically.

        Example:
            >>> v.save("evil-copy.safetensors")
        """
    @staticmethod
    def from_numpy(array: npt.ArrayLike, name: str = "vector", metadata: Optional[Mapping[str, str]] = None) -> Vector:
        """A vector from an array [N+1, hidden] (cast to float32; non-finite values are refused).

        Example:
            >>> v = persona.Vector.from_numpy(np.zeros((31, 576)), name="zero")
        """
    def to_numpy(self) -> npt.NDArray[np.float32]:
        """A copy of the values, float32 [N+1, hidden].

        Example:
            >>> v.to_numpy()[18]          # the direction at residual index 18
        """
    @staticmethod
    def import_control_vector(path: _Path, model: Model) -> Vector:
        """Import a llama.cpp control vector (GGUF) for `model`.

        Example:
            >>> v = persona.Vector.import_control_vector("happy.gguf", m)
        """
    def export_control_vector(self, path: _Path, model_hint: str = "") -> None:
        """Export as a llama.cpp control vector (residual indices 2..=N; others must be zero).

        Example:
            >>> v.only_layers(list(range(2, 31))).export_control_vector("evil.gguf")
        """
    @property
    def name(self) -> str: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def layer(self) -> Optional[int]:
        """The steering layer `persona eval` recorded (`persona.layer`), if any."""
    @property
    def metadata(self) -> dict[str, str]: ...
    def norms(self) -> npt.NDArray[np.float32]:
        """The L2 norm of every row, float32 [N+1].

        Example:
            >>> int(v.norms().argmax())   # the layer where the vector is largest
        """
    @overload
    def cosine(self, other: Vector, layer: int) -> float: ...
    @overload
    def cosine(self, other: Vector, layer: None = None) -> npt.NDArray[np.float32]: ...
    def orthogonalize(self, other: Vector) -> Vector:
        """This vector minus its component along `other`, layer by layer.

        Example:
            >>> evil_only = evil.orthogonalize(impolite)
        """
    def only_layers(self, layers: Sequence[int]) -> Vector:
        """Only the rows of `layers` kept, the others zero.

        Example:
            >>> v.only_layers([18])
        """
    def __add__(self, other: Vector) -> Vector: ...
    def __sub__(self, other: Vector) -> Vector: ...
    def __mul__(self, c: float) -> Vector: ...
    def __rmul__(self, c: float) -> Vector: ...
    def __neg__(self) -> Vector: ...

class Generation:
    """One finished generation.

    `projections[name]`: float32 [generated tokens, layers] (columns in `layers[name]` order);
    `prompt_projections[name]`: the same over the prompt tokens (the last row is the prompt score).

    Example:
        >>> g = m.generate("Hi", monitor=["evil"])
        >>> g.projections["evil"].mean(0)
    """

    @property
    def text(self) -> str: ...
    @property
    def ids(self) -> npt.NDArray[np.uint32]: ...
    @property
    def prompt_ids(self) -> npt.NDArray[np.uint32]: ...
    @property
    def finish_reason(self) -> str:
        """`eos`, `length` or `stopped`."""
    @property
    def projections(self) -> dict[str, npt.NDArray[np.float32]]: ...
    @property
    def prompt_projections(self) -> dict[str, npt.NDArray[np.float32]]: ...
    @property
    def layers(self) -> dict[str, list[int]]: ...
    @property
    def receipts(self) -> list[dict[str, Any]]:
        """Per steering op: the tokens it touched, and how often its `when` condition fired."""
    @property
    def warnings(self) -> list[str]: ...

class Token:
    """One streamed token, with its projections ({name: float32 [layers]}) read at the position
    that produced it, as the HTTP stream's per-token `persona` object: the first token's are the
    last prompt token's (`Generation.prompt_projections[name][-1]`), token i's (i ≥ 1) are
    `Generation.projections[name][i - 1]`. A text piece that ends inside a multi-byte character
    is held back and comes with the next token.

    Example:
        >>> for t in m.generate("Hi", monitor=["evil"], stream=True): print(t.text, t.projections["evil"])
    """

    @property
    def index(self) -> int: ...
    @property
    def id(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def projections(self) -> dict[str, npt.NDArray[np.float32]]: ...

class TokenStream(Iterator[Token]):
    """The tokens of a streamed generation; `result` holds the Generation once exhausted.

    Example:
        >>> s = m.generate("Hi", stream=True); text = "".join(t.text for t in s); s.result.finish_reason
    """

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> Token: ...
    @property
    def result(self) -> Optional[Generation]: ...
    def close(self) -> None:
        """Stop generating."""

class Model:
    """A chat model on a backend (cpu, cuda, wgpu).

    Example:
        >>> m = persona.Model.load(backend="cpu")
    """

    @staticmethod
    def load(
        path_or_name: Optional[_Path] = None,
        backend: str = "auto",
        adapter: Optional[_Path] = None,
        context: int = 4096,
        vectors: Optional[_Path] = None,
    ) -> Model:
        """A GGUF file, HF folder, a name from `persona fetch --list`, or None (the default model).

        Example:
            >>> m = persona.Model.load("qwen2.5-coder-0.5b")
        """
    @property
    def backend(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def vector_dirs(self) -> List[Path]: ...
    def vector_names(self) -> list[str]:
        """The vectors `vector="NAME"` finds for this model.

        Example:
            >>> m.vector_names()
            ['apathetic', 'evil', ...]
        """
    def vector(self, name_or_path: str) -> Vector:
        """A vector by name or path, checked to fit this model.

        Example:
            >>> evil = m.vector("evil")
        """
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Example:
        >>> m.encode("Hello")
        """
    def decode(self, ids: Sequence[int]) -> str:
        """Example:
        >>> m.decode([19556])
        """
    @overload
    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 64,
        *,
        system: Optional[str] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        steer: Optional[Steer] = None,
        monitor: Optional[Monitor] = None,
        stream: bool = False,
        ignore_eos: bool = False,
        raw: bool = False,
    ) -> Union[Generation, TokenStream]:
        """Generate from one prompt (→ Generation, or TokenStream with stream=True).

        Example:
            >>> g = m.generate("Tell me a story.", max_tokens=32,
            ...                steer=[{"vector": "evil", "layers": 18, "coeff": 4}], monitor=["evil"])
        """
    @overload
    def generate(
        self,
        prompt: Prompts,
        max_tokens: int = 64,
        *,
        system: Optional[str] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        steer: Optional[Union[Steer, Sequence[Optional[Sequence[SteerOp]]]]] = None,
        monitor: Optional[Union[Monitor, Sequence[Optional[Sequence[MonitorItem]]]]] = None,
        stream: bool = False,
        ignore_eos: bool = False,
        raw: bool = False,
    ) -> List[Generation]:
        """A batch run together (→ list[Generation]); `steer`/`monitor` may be one list per prompt.

        Example:
            >>> gs = m.generate(["Hi", "Hello"], steer=[[], [{"vector": "evil", "coeff": 4}]])
        """
    def residuals(
        self, messages: Sequence[Message], layers: Optional[Sequence[int]] = None, mean: bool = True
    ) -> npt.NDArray[np.float32]:
        """Residuals at `layers`: mean over the answer tokens [layers, hidden], or every token
        [layers, tokens, hidden] with mean=False.

        Example:
            >>> m.residuals([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], [18])
        """
    def extract(
        self,
        trait: Optional[str] = None,
        *,
        pairs: Optional[Sequence[Mapping[str, str]]] = None,
        name: Optional[str] = None,
        questions: int = 5,
        instructions: Optional[int] = None,
        samples: int = 1,
        max_tokens: int = 48,
        temperature: float = 1.0,
        seed: int = 0,
        method: str = "response_avg",
        baseline: bool = True,
    ) -> Vector:
        """A persona vector from a trait (catalog name or JSON file) or from your own
        `pairs=[{"question", "pos", "neg"}]`.

        Example:
            >>> v = m.extract("evil", questions=5)
        """
    def screen(
        self,
        rows: Sequence[Mapping[str, Any]],
        vector: Union[Vector, str],
        layer: Optional[int] = None,
        max_tokens: int = 64,
        random: int = 0,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """ΔP per training row: the row's response projection minus the model's own answer's.

        Example:
            >>> m.screen([{"prompt": "Hi", "response": "Get lost."}], "evil")[0]["delta_p"]
        """
    def finetune(
        self,
        rows: Sequence[Mapping[str, Any]],
        out: _Path,
        *,
        steer: Optional[Steer] = None,
        monitor: Optional[Monitor] = None,
        steps: Optional[int] = None,
        epochs: float = 1.0,
        lr: float = 1e-4,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        batch: int = 8,
        seed: int = 0,
        random_control: Optional[int] = None,
        max_len: int = 512,
    ) -> list[dict[str, Any]]:
        """LoRA fine-tuning on the CPU with steering in the training pass (the vaccine); writes a
        PEFT adapter to `out` and returns one dict per optimiser step.

        Example:
            >>> log = m.finetune([{"prompt": "Hi", "response": "Hello!"}], "adapter/",
            ...                  steer=[{"vector": "evil", "coeff": 4}], steps=10)
        """
