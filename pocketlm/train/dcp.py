"""Training state through torch.distributed.checkpoint (DCP): every rank writes its own shards, and any
world size reads them back (DCP reshards by parameter name), so a run saved on 1 rank resumes on 4
and back. The model and optimizer state go through DCP; the loop's state stays JSON (checkpointer.py).

DCP's reader unpickles the checkpoint's `.metadata` with a plain `pickle.load` (torch 2.13's
FileSystemReader.read_metadata), and its default load planner reads non-tensor entries with
`torch.load(weights_only=False)`: both would run code from a crafted checkpoint. Here the metadata
goes through an Unpickler that resolves only DCP's own metadata classes (torch's weights_only
unpickler cannot read it: it stops at protocol 4's FRAME opcode), and the non-tensor entries through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from pocketlm.model.checkpoint import CheckpointError

# what a DCP .metadata file may name (module -> names), nothing that can run code
ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a dict lookup of torch's layouts by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if name in ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source}: refused: the checkpoint metadata names {module}.{name}, which is not "
                              "part of a torch.distributed.checkpoint metadata file (a crafted checkpoint?)")


def read_metadata(path) -> Metadata:
    """A DCP .metadata file, unpickled with only DCP's metadata classes allowed."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: expected torch.distributed.checkpoint Metadata, got {type(metadata).__name__}")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader with read_metadata through the restricted unpickler above."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (an optimizer's lr, betas, step counts) through torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # as DefaultLoadPlanner does

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def train_state(model, optimizers) -> dict:
    """{"model": ..., "optim": ...} keyed by parameter name (DTensor shards under FSDP2, plain tensors
    otherwise): the layout DCP saves and reshards from. Optimizers with no state yet get it first."""
    msd, osd = get_state_dict(model, optimizers)
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it assumes one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        if not torch.distributed.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_state(path, model, optimizers, process_group=None, asynchronous: bool = False):
    """Every rank writes its part of the state under `path`; returns the async future when asked."""
    sd = train_state(model, optimizers)
    writer = FileSystemWriter(str(path))
    with _one_process_quietly():
        if asynchronous:
            return dcp.async_save(sd, storage_writer=writer, process_group=process_group)
        dcp.save(sd, storage_writer=writer, process_group=process_group)
    return None


def load_state(path, model, optimizers) -> None:
    """The state under `path`, saved at any world size, into this rank's model and optimizers."""
    read_metadata(pathlib.Path(path) / ".metadata")  # refused here, on every rank, before DCP opens it
    sd = train_state(model, optimizers)
    with _one_process_quietly():
        dcp.load(sd, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    set_state_dict(model, optimizers, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def full_weights(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (an empty dict on the other ranks; a collective
    under FSDP2): the consolidated model.safetensors that export, generate and serve read."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return {k: v.contiguous() for k, v in sd.items()}
