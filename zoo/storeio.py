"""Key-level reads and writes under a zoo's root, the same on a local directory and an object store.

They work on keys whether or not Zarr still sees a group there (gc deletes ``zarr.json`` first),
and read group documents as JSON in one request each, concurrently (opening each commit as a Zarr
group is what made reading 10,000 commit documents slow). Commit and snapshot documents are
never rewritten once written, so what was read is cached for the life of the ``Zoo``.
"""
from __future__ import annotations

import asyncio
import json

from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync


class StoreIO:
    """Mixed into ``zoo.store.Zoo``: needs ``root`` (a Zarr group), ``url``, ``storage_options``,
    ``_docs`` (a dict) and ``_fs`` (None until an fsspec file system is needed)."""

    def _path(self, key: str) -> str:
        return f"{self.root.store_path.path}/{key}".strip("/")

    def _commit_path(self, key: str) -> str:
        cid, name = key.split("/", 1)
        return f"collections/{cid}/commits/{name}"

    def _list_commits(self) -> list[str]:
        """Every commit as "cid/name", sorted: one listing per collection, no document read."""
        out = []
        for cid in sorted(c for c in self._list("collections") if c != "zarr.json"):
            out += [f"{cid}/{n}" for n in sorted(self._list(f"collections/{cid}/commits")) if n != "zarr.json"]
        return out

    def _read_docs(self, paths: list[str]) -> list[dict]:
        """The attributes of these group documents (commits and snapshots never change: cached),
        fetched concurrently (one request each on object stores)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._docs]
        if todo:
            self._docs.update(zip(todo, self._fetch_docs(todo)))
        return [self._docs[p] for p in paths]

    def _read_present(self, paths: list[str]) -> list[dict | None]:
        """Documents of ``paths``, None for those that are not there: deleted since they were listed
        (a concurrent merge or gc), or never published (a writer killed before its commit's document
        landed leaves the commit's folder without it)."""
        try:
            return self._read_docs(paths)
        except FileNotFoundError:
            out = []
            for p in paths:
                try:
                    out.append(self._read_docs([p])[0])
                except FileNotFoundError:
                    out.append(None)
            return out

    def _fetch_docs(self, paths: list[str]) -> list[dict]:
        proto = default_buffer_prototype()

        async def get_all():
            return await asyncio.gather(*(self.root.store.get(self._path(f"{p}/zarr.json"), prototype=proto) for p in paths))

        out = []
        for p, buf in zip(paths, sync(get_all())):
            if buf is None:
                raise FileNotFoundError(f"{self.url}/{p}")
            out.append(json.loads(buf.to_bytes()).get("attributes", {}))
        return out

    def _get_bytes(self, key: str) -> bytes:
        buf = sync(self.root.store.get(self._path(key), prototype=default_buffer_prototype()))
        if buf is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        return buf.to_bytes()

    def _set_bytes(self, key: str, data: bytes) -> None:
        """One key, written whole (temp file + rename locally, one PUT on object stores)."""
        sync(self.root.store.set(self._path(key), cpu.Buffer.from_bytes(data)))

    def _open_file(self, key: str):
        """A seekable file for Parquet's partial reads: a local path, or an fsspec file."""
        store = self.root.store
        if hasattr(store, "root"):  # LocalStore
            return str(store.root / self._path(key))
        if self._fs is None:
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
        return self._fs.open(f"{store.path}/{self._path(key)}".replace("//", "/"), "rb")

    def _exists(self, key: str) -> bool:
        return sync((self.root.store_path / key).exists())

    def _list(self, key: str) -> list[str]:
        prefix = f"{self.root.store_path.path}/{key}".strip("/")

        async def ls():
            return [x async for x in self.root.store.list_dir(prefix)]

        try:
            return sync(ls())
        except FileNotFoundError:
            return []

    def _delete_key(self, key: str) -> None:
        try:
            sync((self.root.store_path / key).delete())
        except FileNotFoundError:
            pass

    def _delete_prefix(self, key: str) -> None:
        try:
            sync((self.root.store_path / key).delete_dir())
        except FileNotFoundError:
            pass
