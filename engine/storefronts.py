"""The storefronts of one engine process: a Digital River client for each storefront with a key.

The Salesforce app runs its jobs for one storefront at a time (`cc_batch_SubscriptionProcessor('DefaultStore',
…)`); one engine serves every storefront configured in its settings (docs/contract.md, Storefronts). Each gets a
`DigitalRiverClient` of its own: its key, base URL, rate budget (DR_MAX_REQUESTS_PER_SECOND_<STORE>, split among
the live engine processes that hold that key), 429 pause and refused-key state, so nothing one storefront meets at
Digital River slows another. Records name their storefront as the outside system wrote it (`EU Store`); they are
matched to settings by label (`storefront_label`: `EU_STORE`, the STORE of `DR_API_KEY_EU_STORE`), in Python and
in SQL (`drjobs_storefront_label`). A record whose storefront has no client waits, untouched.

Two storefronts configured with the same key and URL share one client: Digital River counts the key's requests,
not ours, so two buckets for one key would together send twice its limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from engine.digital_river import DigitalRiverClient
from engine.logs import AppLogSink
from engine.metrics import Metrics
from engine.settings import DEFAULT_STOREFRONT, Settings, storefront_label

__all__ = ["DEFAULT_STOREFRONT", "Storefront", "Storefronts", "storefront_label"]


@dataclass(frozen=True)
class Storefront:
    """A storefront this process can charge and fulfill for: its label and its client."""

    label: str
    client: DigitalRiverClient


class Storefronts:
    """Every storefront client of this process, by label."""

    def __init__(self, settings: Settings, app_log: AppLogSink | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        by_key: dict[tuple[str, str], DigitalRiverClient] = {}
        self._by_label: dict[str, Storefront] = {}
        for config in settings.keyed_storefronts:
            assert config.api_key is not None
            client = by_key.get((config.api_key, config.api_url))
            if client is None:
                client = by_key[(config.api_key, config.api_url)] = DigitalRiverClient.from_settings(
                    settings, app_log, config)
                client.metrics = metrics
            self._by_label[config.label] = Storefront(config.label, client)
        self.clients: list[DigitalRiverClient] = list(by_key.values())

    def __iter__(self) -> Iterator[Storefront]:
        return iter(self._by_label.values())

    def __len__(self) -> int:
        return len(self._by_label)

    @property
    def labels(self) -> list[str]:
        """The labels of the storefronts with a key, DefaultStore first."""
        return list(self._by_label)

    def client(self, storefront: str) -> DigitalRiverClient | None:
        """The client for records of the storefront named `storefront` (a name or a label), None without a key."""
        found = self._by_label.get(storefront_label(storefront))
        return None if found is None else found.client

    @property
    def default(self) -> DigitalRiverClient | None:
        """DefaultStore's client (DR_API_KEY), if it has one."""
        return self.client(DEFAULT_STOREFRONT)

    def key_refused(self) -> list[str]:
        """Labels of the storefronts whose key Digital River refused at its last answer (for /readyz)."""
        return [s.label for s in self if s.client.key_refused]

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def __aenter__(self) -> Storefronts:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def set_shares(self, live_by_key: dict[str, int], live_nodes: int) -> None:
        """Each client uses 1/n of its storefront's budget, n the live processes holding its key (`live_by_key`,
        by key_id; a key no process published yet: every live process, `live_nodes`)."""
        for client in self.clients:
            client.set_share(live_by_key.get(client.key_id) or live_nodes)

    def published(self) -> dict[str, dict[str, object]]:
        """What engine_nodes.settings says of them (never a secret): label → key_id, URL and budget."""
        return {s.label: {"key_id": s.client.key_id, "dr_api_url": s.client.base_url,
                          "dr_max_requests_per_second": s.client.max_requests_per_second} for s in self}

