"""Configuration of CogVLM: the EVA2-CLIP-E vision tower, the Vicuna decoder, and the model that holds both.

Fields are read from (and written back to) the hub's `config.json` (`THUDM/cogvlm-chat-hf` and siblings), whose
vision part is a nested `vision_config` dict. The four published checkpoints ship here as named presets so that
planning and tests work offline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from .layout import image_token_count


@dataclass
class VisionConfig:
    """EVA2-CLIP-E (CogVLM keeps 63 of its 64 layers)."""

    hidden_size: int = 1792  # width of the ViT residual stream
    intermediate_size: int = 15360  # width of the ViT MLP
    num_heads: int = 16  # attention heads; head_dim = hidden_size // num_heads
    num_hidden_layers: int = 63  # transformer blocks
    image_size: int = 490  # input images are resized to image_size x image_size
    patch_size: int = 14  # conv patch embedding kernel and stride
    in_channels: int = 3  # RGB
    num_positions: int = 1226  # learned positions: one per patch plus the cls token
    layer_norm_eps: float = 1e-6  # eps of the post-sublayer LayerNorms
    hidden_act: str = "gelu"  # exact (erf) GELU in the MLP
    dropout_prob: float = 0.0  # unused at inference; kept for round-tripping the hub config

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_positions != self.num_patches + 1:
            raise ValueError(
                f"vision num_positions is {self.num_positions}, but image_size {self.image_size} and patch_size "
                f"{self.patch_size} give {self.num_patches} patches + 1 cls = {self.num_patches + 1}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Vicuna-7B-v1.5 (Llama-2 architecture); every layer also carries a visual expert of the same shapes."""

    hidden_size: int = 4096  # width of the decoder residual stream
    intermediate_size: int = 11008  # width of the SwiGLU MLP (also the adapter's GLU width)
    num_attention_heads: int = 32  # attention heads; head_dim = hidden_size // num_attention_heads
    num_hidden_layers: int = 32  # decoder layers
    vocab_size: int = 32000  # Llama-2 SentencePiece vocabulary
    rms_norm_eps: float = 1e-5  # eps of every RMSNorm
    max_position_embeddings: int = 2048  # longest sequence the model was trained on
    rope_theta: float = 10000.0  # rotary base (the reference hard-codes 10000)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0  # `<unk>`; also the placeholder id of image positions

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class CogVLMConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    template_version: str = "chat"  # default prompt template: "chat", "vqa" or "base"

    def __post_init__(self):
        if self.template_version not in ("chat", "vqa", "base"):
            raise ValueError(f"template_version must be chat, vqa or base, not {self.template_version!r}")

    @property
    def num_image_tokens(self) -> int:
        """Sequence positions an image occupies: boi, one per patch, eoi."""
        return image_token_count(self.vision.image_size, self.vision.patch_size)

    # -- the hub's config.json -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "CogVLMConfig":
        if "vision_config" not in d or "hidden_size" not in d:
            raise ValueError(
                "this config.json is not a CogVLM config (it has no 'vision_config'/'hidden_size'); "
                "point at a THUDM/cogvlm-*-hf checkpoint folder"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported decoder hidden_act {d['hidden_act']!r}: CogVLM uses silu")
        text = TextConfig(**_pick(TextConfig, d))
        vision = VisionConfig(**_pick(VisionConfig, d["vision_config"]))
        return cls(text=text, vision=vision, template_version=d.get("template_version", "chat"))

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in asdict(self.text).items() if k != "rope_theta"}
        d.update(
            architectures=["CogVLMForCausalLM"],
            hidden_act="silu",
            template_version=self.template_version,
            vision_config=asdict(self.vision),
            tie_word_embeddings=False,
        )
        return d

    # -- our own files -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"text": asdict(self.text), "vision": asdict(self.vision), "template_version": self.template_version}

    @classmethod
    def from_dict(cls, d: dict) -> "CogVLMConfig":
        return cls(
            text=TextConfig(**d["text"]),
            vision=VisionConfig(**d["vision"]),
            template_version=d.get("template_version", "chat"),
        )

    @classmethod
    def from_name(cls, name: str) -> "CogVLMConfig":
        """A preset by checkpoint name, with or without the `THUDM/` prefix."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown CogVLM preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[key]()

    @classmethod
    def load(cls, path: str | Path) -> "CogVLMConfig":
        """Read a preset name, one of our config files, a hub config.json, or a folder holding either."""
        path = Path(path)
        if not path.exists() and path.name.split("/")[-1] in PRESETS:
            return cls.from_name(str(path))
        if path.is_dir():
            for candidate in (path / CONFIG_FILE, path / "config.json"):
                if candidate.exists():
                    return cls.load(candidate)
            raise FileNotFoundError(f"{path} holds neither {CONFIG_FILE} (converted) nor config.json (hub layout)")
        d = json.loads(path.read_text())
        return cls.from_dict(d) if "text" in d and "vision" in d else cls.from_hf_dict(d)


CONFIG_FILE = "cogvlm_config.json"  # our converted layout's config


def _pick(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _vision_224() -> VisionConfig:
    return VisionConfig(image_size=224, num_positions=(224 // 14) ** 2 + 1)


# The four published checkpoints (their config.json files differ only in template and image size).
PRESETS = {
    "cogvlm-chat-hf": lambda: CogVLMConfig(template_version="chat"),
    "cogvlm-base-490-hf": lambda: CogVLMConfig(template_version="base"),
    "cogvlm-base-224-hf": lambda: CogVLMConfig(vision=_vision_224(), template_version="base"),
    "cogvlm-grounding-generalist-hf": lambda: CogVLMConfig(template_version="base"),
}
