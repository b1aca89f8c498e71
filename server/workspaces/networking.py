"""Workspaces' network policies (server/network/): checked against the operator's ceiling,
stored on the row, and brought into the host's firewall after every start, stop, pause and
delete. Denied connections become rate-limited events on the workspace that tried."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from server.db.models import Snapshot, Workspace
from server.errors import DenError
from server.network import policy as net_policy
from server.network.denials import Denial, RateLimit
from server.workspaces.part import ServicePart

if TYPE_CHECKING:
    from server.workspaces.service import WorkspaceService

log = logging.getLogger(__name__)


class WorkspaceNetworks(ServicePart):
    """The network-policy side of :class:`WorkspaceService`."""

    def __init__(self, svc: WorkspaceService) -> None:
        super().__init__(svc)
        self._containers: dict[str, str] = {}  # container name -> workspace id
        # workspace id -> (engine handle, network column, sandbox name, policy): see policies
        self._seen: dict[str, tuple[Any, Any, str, net_policy.NetworkPolicy]] = {}
        self._denials = RateLimit()
        self.guard = svc.network  # None: no policy enforced on this host

    def validate(self, mode: str | None, allow: Sequence[str]) -> net_policy.NetworkPolicy:
        """A requested policy checked against the operator's ceiling (422/403)."""
        st = self.settings
        return net_policy.validate(
            mode or st.network_default_mode, list(allow), ceiling=st.network_max_mode,
            user_ranges=net_policy.parse_ranges(st.network_user_allow),
            operator=net_policy.parse_ranges(st.network_allow),
            domains=net_policy.user_domains(st))

    def policy(self, ws: Workspace) -> net_policy.NetworkPolicy:
        return net_policy.NetworkPolicy.from_json(ws.network,
                                                  default=self.settings.network_default_mode)

    def forked(self, snap: Snapshot) -> net_policy.NetworkPolicy:
        """A fork gets its origin's policy (kept on the snapshot), within today's ceiling."""
        wanted = net_policy.NetworkPolicy.from_json(snap.network,
                                                    default=self.settings.network_default_mode)
        ceiling = self.settings.network_max_mode
        if net_policy.MODES.index(wanted.mode) > net_policy.MODES.index(ceiling):
            return net_policy.NetworkPolicy(mode=ceiling)
        return net_policy.within(wanted, net_policy.user_domains(self.settings))

    async def set(self, ws_id: str, mode: str, allow: Sequence[str], *, actor: str
                          ) -> Workspace:
        """Change a workspace's policy; a running one gets it at once, with its processes
        and connections as they are (a tighter policy cuts the connections it forbids)."""
        policy = self.validate(mode, allow)
        allowed = f" ({', '.join(str(e) for e in policy.allow)})" if policy.allow else ""
        self.ledger.change(ws_id, {"network": policy.to_json(), "updated_at": datetime.now(UTC)},
                           event=("network", f"network policy set to {policy.mode}{allowed}"),
                           actor=actor)
        if self.guard is not None:
            await self.guard.sync(self.policies)
        return self.svc.get(ws_id)

    def policies(self) -> dict[str, net_policy.NetworkPolicy]:
        """Sandbox name -> policy, of every workspace (paused and stopped ones too: their
        pins are kept). Read at every sync, that is at every start, stop, pause and resume,
        on the event loop: with 2,000 workspaces, loading every row and building its spec
        took ~160 ms a call (bench_paused). So only three columns are read, and a row's name
        and parsed policy are remembered while its handle and policy stay as they were;
        whole rows are loaded only for workspaces new or changed since the last call."""
        with self.sessions() as s:
            cols = list(s.execute(select(Workspace.id, Workspace.engine, Workspace.network)))
            changed = [ws_id for ws_id, engine, network in cols
                       if (seen := self._seen.get(ws_id)) is None
                       or seen[0] != engine or seen[1] != network]
            for chunk in range(0, len(changed), 500):
                for ws in s.scalars(select(Workspace).where(
                        Workspace.id.in_(changed[chunk:chunk + 500]))):
                    self._seen[ws.id] = (ws.engine, ws.network, self.svc.sandbox_name(ws),
                                         self.policy(ws))
        ids = {ws_id for ws_id, _, _ in cols}
        self._seen = {k: v for k, v in self._seen.items() if k in ids}
        self._containers = {name: ws_id for ws_id, (_, _, name, _) in self._seen.items()}
        return {name: policy for _, _, name, policy in self._seen.values()}

    def record_denial(self, denial: Denial) -> None:
        """A connection the firewall refused: an event of kind ``network`` on the workspace
        that tried (at most one per destination a minute)."""
        container = self.guard.container_at(denial.source) if self.guard else None
        ws_id = self._containers.get(container or "")
        if ws_id is None or not self._denials.allow(ws_id, denial.describe()):
            return
        try:
            mode = self.policy(self.svc.get(ws_id)).mode
            self.ledger.note(ws_id, "network",
                             f"denied {denial.describe()} (network policy {mode}; further "
                             "denials of it are not recorded for a minute)")
        except (DenError, SQLAlchemyError):  # the workspace went meanwhile
            return

    async def sync(self, ws_id: str) -> None:
        """Bring the host's firewall in step after ``ws_id`` started, stopped or went.
        A failure leaves the workspace without network (unknown addresses are rejected)
        and is recorded."""
        if self.guard is None:
            return
        try:
            await self.guard.sync(self.policies)
        except DenError as exc:
            log.error("workspace %s: network rules not applied: %s %s", ws_id, exc.message,
                      exc.detail)
            with contextlib.suppress(SQLAlchemyError):
                self.ledger.note(ws_id, "network", f"network rules not applied: {exc.message}")


