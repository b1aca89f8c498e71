"""Den's one typed settings tree.

Every field reads from the environment as ``DEN_<NAME>`` and is documented in
``docs/configuration.md`` (a test keeps the two in step). ``den serve`` flags override
the environment for host, port, ssh_port and data_dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration. Build it once (in the CLI or a test) and pass it down."""

    model_config = SettingsConfigDict(env_prefix="DEN_", extra="ignore")

    # --- server -------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8080, description="Port of the HTTP API and web UI.")
    ssh_port: int = Field(
        2222,
        description=(
            "Port of the SSH gateway, on the same address as the HTTP API; 0 turns the gateway "
            "off."
        ),
    )
    data_dir: Path = Field(
        Path("/var/lib/den"),
        description="Where Den keeps its SQLite database, temporary clones and host keys.",
    )
    database_url: str = Field(
        "",
        description=(
            "SQLAlchemy URL of the database. Empty means SQLite at <data_dir>/den.db. "
            "PostgreSQL: postgresql+psycopg://user:pass@host/db."
        ),
    )
    auto_migrate: bool = Field(
        True,
        description=(
            "Upgrade the database schema on start. When false, `den serve` refuses to start "
            "on an out-of-date schema and says which command upgrades it."
        ),
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "`text` (one line per record) or `json` (one JSON object per line, for log "
            "shippers). Both carry the request id and the workspace id."
        ),
    )
    metrics_token: SecretStr = Field(
        SecretStr(""),
        description=(
            "A bearer token that may read `/metrics` (besides an admin's API token), for a "
            "Prometheus server. Empty: only admins' API tokens."
        ),
    )
    metrics_listen: str = Field(
        "",
        description=(
            "`host:port` of a second listener that serves only the metrics, without a token "
            "(protect it by where it listens, e.g. 127.0.0.1:9464). Empty: none."
        ),
    )
    public_host: str = Field(
        "",
        description="Host name users reach Den by (shown in SSH details); empty means --host.",
    )

    # --- engine -------------------------------------------------------------------
    docker_url: str = Field(
        "", description="Docker engine address; empty means the environment's default socket."
    )
    engine_prefix: str = Field(
        "den",
        description=(
            "Prefix of every container and volume name Den creates. Lets several Den "
            "installations (or test runs) share one engine."
        ),
    )
    backend: Literal["docker", "microvm"] = Field(
        "docker",
        description="The workspace backend (server/backends.py): `docker`, the Docker "
        "engine with gVisor; `microvm`, QEMU microVMs (docs/microvm.md).",
    )
    microvm_dir: Path | None = Field(
        None,
        description="The microVM backend's boot files (vmlinux, initramfs.cpio, rootfs.ext4, "
        "built by scripts/setup-microvm.sh) and, under vms/, one directory per workspace VM. "
        "Unset: <data_dir>/microvm.",
    )
    microvm_accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto",
        description="How microVMs run: `kvm` (hardware virtualization), `tcg` (QEMU's software "
        "emulation, several times slower), or `auto`: KVM when /dev/kvm boots a guest (checked "
        "at start), else TCG.",
    )
    microvm_qemu: str = Field(
        "qemu-system-x86_64", description="The QEMU binary that runs microVMs."
    )
    microvm_boot_timeout_s: float = Field(
        120.0, gt=0,
        description="How long a microVM may take from start until its agent answers; past it "
        "the start fails and the VM is ended.",
    )
    microvm_user: str = Field(
        "den-vm", max_length=32,
        description="With DEN_MICROVM_UID_BASE=0: the system user every QEMU runs as once "
        "it has set a microVM up (QEMU's `-runas`: the disks, sockets and /dev/kvm are "
        "opened as root first); scripts/setup-microvm.sh creates it. Empty: QEMU stays root "
        "(not for untrusted workspaces).",
    )
    microvm_uid_base: int = Field(
        2_000_000_000, ge=0, lt=2**31,
        description="The first of the uids microVMs run as: each VM's QEMU drops root to a "
        "uid (and group) of its own from this range, recorded with the VM (docs/microvm.md). "
        "Choose a range no system user or user namespace uses. 0: every QEMU runs as "
        "DEN_MICROVM_USER instead.",
    )
    microvm_uid_count: int = Field(
        1_000_000, ge=1, le=2**30,
        description="How many uids from DEN_MICROVM_UID_BASE microVMs may run as; a uid is "
        "used again only after the whole range has gone round.",
    )
    microvm_subnet: str = Field(
        "10.88.0.0/16",
        description="IPv4 subnet (CIDR) of the bridge Den makes for microVMs' NICs (with "
        "network isolation on); the host takes its first address (the VMs' gateway and DNS "
        "forwarder), each VM one of the others. Pick a range no other network of the host "
        "uses.",
    )
    microvm_image_max_mb: int = Field(
        4096, ge=64,
        description="The largest image (its unpacked filesystem, in MB) a microVM workspace may "
        "run: an image other than the setup's is converted into a root filesystem of its own "
        "(docs/microvm.md, Images); a larger one is refused.",
    )
    microvm_console_log: bool = Field(
        False,
        description="Keep each microVM's serial console (kernel and agent messages) in "
        "console.log in its directory, for debugging a guest that does not boot.",
    )
    engine_threads: int = Field(
        32,
        ge=1,
        description=(
            "Threads for long blocking Docker engine calls (the Docker backend's executor for "
            "execs through the engine, checkpoints, copies); short calls (state reads, "
            "inspects) have a pool of their own, so they never wait behind these."
        ),
    )
    agent_binary: str = Field(
        "",
        description="The in-workspace agent (den-agent, built by scripts/build-agent.sh). "
        "Empty: build/agent/den-agent in Den's source tree. Den copies it under "
        "<data_dir>/agent/<version>/ and mounts that directory read-only at /.den in every "
        "workspace it creates; when the file is missing, new workspaces run without an agent "
        "(commands through the engine's exec, slower, and processes lost at pause).",
    )
    gvisor_runtime: str = Field(
        "runsc", description="Name of the Docker runtime that runs gVisor (daemon.json)."
    )
    runsc_path: str = Field(
        "runsc", description="The runsc binary, to read a sandbox's process list before a pause."
    )
    runsc_root: str = Field(
        "/run/docker/runtime-runc/moby",
        description="runsc's state directory for Docker's containers (Docker 20.10's default).",
    )
    allow_insecure_runc: bool = Field(
        False,
        description=(
            "Allow workspaces with runtime `runc` (no gVisor sandbox: a kernel exploit in a "
            "workspace owns the host). Off by default; only for trusted users."
        ),
    )
    default_image: str = Field(
        "den/workspace:latest", description="Image used when a create request names none."
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description=(
            "Images users may ask for, besides the default. Empty means only images whose "
            "name starts with `den/`."
        ),
    )
    stop_timeout_s: int = Field(
        5, description="Seconds a stopping workspace gets after SIGTERM before SIGKILL."
    )
    engine_check_interval_s: float = Field(
        10,
        description=(
            "How often the server checks that the engine answers while it works (`/healthz` "
            "reports the last check); `0`: no periodic check (a call that finds the engine "
            "unreachable still starts the retries)."
        ),
    )
    engine_retry_max_s: float = Field(
        30,
        description=(
            "While the engine does not answer, the server retries after 1 s, doubling up to "
            "this; once it answers again, reconcile runs again."
        ),
    )
    shutdown_grace_s: int = Field(
        10,
        description=(
            "On SIGTERM or Ctrl-C, how long calls in flight get to finish before they are "
            "cut; the process exits at most a few seconds after that."
        ),
    )

    # --- network isolation (docs/security.md) ---------------------------------------------
    network_isolation: bool = Field(
        True,
        description=(
            "Put every new workspace on a bridge network of Den's own and enforce each "
            "workspace's network policy with host firewall rules (iptables, as root). Off: "
            "workspaces join the engine's default bridge with no policy (each reaches the host, "
            "the LAN, the metadata service and the others)."
        ),
    )
    network_name: str = Field(
        "",
        description="Name of Den's Docker network; empty means `<engine_prefix>-net`. Den "
        "creates it when it is missing (labelled `den.managed`).",
    )
    network_subnet: str = Field(
        "", description="IPv4 subnet of Den's network (CIDR); empty lets the engine pick one."
    )
    network_default_mode: Literal["none", "allowlist", "internet"] = Field(
        "internet", description="Network mode of a workspace created without `network`."
    )
    network_max_mode: Literal["none", "allowlist", "internet"] = Field(
        "internet",
        description=(
            "The ceiling: the most open mode a user may ask for (`none` < `allowlist` < "
            "`internet`)."
        ),
    )
    network_allow: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses every workspace with network (modes `internet` and `allowlist`) may "
            "reach although they are private or the host's, for example an internal package "
            "mirror: CIDRs, `ip:port` or domain names (open on whatever private address "
            "Den's DNS forwarder resolves them to) (JSON list)."
        ),
    )
    network_user_allow: list[str] = Field(
        default_factory=list,
        description=(
            "Private ranges users may name in an allowlist (JSON list of CIDRs or `ip:port`), "
            "and domain names users may list that resolve to private addresses; without them "
            "an allowlist may name public addresses only, and names open public ones only."
        ),
    )
    network_user_domains: list[str] = Field(
        default_factory=lambda: ["*"],
        description=(
            "Domain names users may list in an allowlist (JSON list of patterns): `*` any "
            "name; `pypi.org` that name; `*.corp.example` any name under it; `:port` only "
            "with that port. An entry outside them is refused with 403 "
            "`network_not_allowed`; `[]` allows no names (addresses only). Names in "
            "`DEN_NETWORK_ALLOW` are always allowed."
        ),
    )
    network_log_denied: bool = Field(
        True,
        description=(
            "Record refused connections as workspace events (kind `network`; the firewall logs "
            "them to the kernel log, which Den reads from /dev/kmsg): at most one per workspace "
            "and destination a minute."
        ),
    )
    network_dns: list[str] = Field(
        default_factory=list,
        description=(
            "Upstream name servers of Den's DNS forwarder, which workspaces use (IPv4, JSON "
            "list); empty means the host's (/etc/resolv.conf)."
        ),
    )

    # --- resources -------------------------------------------------------------------
    default_cpus: float = Field(2.0, description="CPUs of a workspace that asks for none.")
    default_memory_mb: int = Field(2048, description="Memory limit of a workspace, in MiB.")
    default_disk_gb: int = Field(
        10, description="Disk of a workspace that asks for none, in GiB (/workspace and its "
        "root filesystem together).")
    default_pids: int = Field(1024, description="Process limit of a workspace (pids cgroup).")
    max_cpus: float = Field(8.0, description="Largest CPU count a workspace may ask for.")
    max_memory_mb: int = Field(16384, description="Largest memory limit a workspace may ask for.")
    max_disk_gb: int = Field(200, description="Largest disk a workspace may ask for, in GiB.")
    enforce_disk_gb: bool = Field(
        True,
        description=(
            "Give each new workspace a disk of its own: a sparse ext4 image of disk_gb GiB "
            "under <data_dir>/disks, loop-mounted (as root), holding /workspace and the "
            "container's writable layer; filling it is ENOSPC inside. Off: disk_gb is "
            "recorded only and a workspace may fill the engine's disk."
        ),
    )
    max_gpus: int = Field(
        8, description="Largest GPU count a workspace may ask for (more is 409 `gpus_unavailable`)."
    )
    gpus: str = Field(
        "auto",
        description=(
            "GPUs Den may hand out: `auto` (discovered through NVML or `nvidia-smi -q -x`), "
            "`none`, a comma-separated list of GPU UUIDs (discovered, then only these), or a "
            "JSON array describing them (`[{\"uuid\": \"GPU-...\", \"model\": ..., "
            "\"memory_mb\": ..., \"minor\": 0}]`, not checked against the driver). See "
            "docs/gpus.md."
        ),
    )
    gpu_runtime: str = Field(
        "runsc-gpu",
        description="Docker runtime of gVisor workspaces with GPUs (runsc with `--nvproxy`).",
    )
    gpu_device_requests: bool = Field(
        False,
        description=(
            "Give runc workspaces their GPUs through Docker device requests (needs the NVIDIA "
            "container toolkit); otherwise Den passes the device nodes and driver files itself."
        ),
    )
    gpu_checkpoint: bool = Field(
        False,
        description=(
            "GPU workspaces may be paused (memory saved): only where gVisor's nvproxy "
            "checkpointing has been shown to work on this host. Otherwise their idle action is "
            "`stop` and a pause is refused."
        ),
    )
    gpu_idle_percent: float = Field(
        5.0, description="GPU utilization (NVML) above which a GPU workspace counts as busy."
    )
    max_workspaces_per_user: int = Field(
        20, ge=0,
        description="Workspaces one user may own at once, in any state (409 `quota_exceeded` "
                    "beyond). This and the other `*_per_user` limits are defaults: an admin "
                    "sets a user's own with `PUT /api/v1/users/{name}/limits`.",
    )

    # --- per-user limits (docs/operations.md, "Quotas") ----------------------------------
    max_cpus_per_user: float = Field(
        32.0, ge=0, description="CPUs of all of one user's workspaces together, in any state."
    )
    max_memory_mb_per_user: int = Field(
        65536, ge=0,
        description="Memory limits of all of one user's workspaces together, in MiB.",
    )
    max_disk_gb_per_user: int = Field(
        500, ge=0, description="Disk sizes of all of one user's workspaces together, in GB."
    )
    max_snapshots_per_user: int = Field(
        50, ge=0,
        description=(
            "Snapshots one user may keep, with memory or not, those of deleted workspaces "
            "included (409 `quota_exceeded` beyond)."
        ),
    )
    max_execs_per_user: int = Field(
        16, ge=0,
        description=(
            "One-shot exec calls of one user running or waiting at once (429 "
            "`quota_exceeded` beyond): one user cannot fill `DEN_EXEC_CONCURRENCY` for all."
        ),
    )
    max_streams_per_user: int = Field(
        16, ge=0, description="Streaming execs (WebSocket) one user may have open at once."
    )
    max_terminals_per_user: int = Field(
        8, ge=0, description="Web terminals one user may have open at once."
    )
    max_ssh_channels_per_user: int = Field(
        32, ge=0,
        description=(
            "SSH channels (shells, commands, SFTP, `-L` forwards) one user may have open at "
            "once, over all their connections."
        ),
    )

    # --- idle policy -------------------------------------------------------------------
    idle_timeout_s: int = Field(
        900, description="A running workspace with no activity for this long is paused."
    )
    stop_after_s: int = Field(
        86400, description="A workspace paused for this long is stopped (its disk is kept)."
    )
    frozen_max_s: int = Field(
        1800,
        description=(
            "An idle workspace is first frozen in place (memory kept, no CPU, wakes in "
            "milliseconds); frozen this long, its memory is saved to disk. 0 skips the "
            "frozen tier: idle workspaces are checkpointed to disk at once."
        ),
    )
    frozen_memory_budget_mb: int = Field(
        4096,
        description=(
            "Memory that frozen workspaces may hold together (MiB); beyond it the longest "
            "frozen are saved to disk. 0: no budget."
        ),
    )
    host_min_available_mb: int = Field(
        1024,
        description=(
            "When the host's available memory is below this (MiB), frozen workspaces are "
            "saved to disk, longest frozen first, until it would be above. 0: not watched."
        ),
    )
    # --- warm pool (server/pool/) -----------------------------------------------------
    pool_size: int = Field(
        0,
        description=(
            "Sandboxes the warm pool keeps booted (frozen) and waiting for each of "
            "`pool_images`; a create that fits one claims it and only seeds its repository. "
            "0 disables the pool."
        ),
    )
    pool_images: list[str] = Field(
        default_factory=list,
        description="Images the warm pool keeps sandboxes of; empty means the default image.",
    )
    pool_memory_budget_mb: int = Field(
        1024,
        description=(
            "Memory the warm pool's sandboxes may hold together (MiB, as measured when each "
            "is frozen); the pool makes no sandbox that would take it past this. 0: no budget."
        ),
    )
    reaper_interval_s: float = Field(
        15, description="How often the idle reaper looks at running and paused workspaces."
    )
    reaper_concurrency: int = Field(
        2, description="Pauses and stops the reaper runs at once (each is a checkpoint)."
    )
    idle_cpu_percent: float = Field(
        10.0,
        description=(
            "CPU use (percent of one CPU, averaged between reaper passes) above which a "
            "workspace counts as busy even with no API or terminal activity."
        ),
    )
    containerd_tmp_dir: Path = Field(
        Path("/tmp"),
        description=(
            "containerd's temp dir; the reaper removes the checkpoint copies "
            "(ctrd-checkpoint*) it leaves there at every resume, once 10 minutes old."
        ),
    )
    max_keepalive_s: int = Field(
        86400, description="The longest lease one keepalive call may take."
    )

    max_snapshots_per_workspace: int = Field(
        10, ge=1, description="Snapshots kept per workspace; taking one more deletes the oldest."
    )
    prebuilds_keep: int = Field(
        1, ge=1, le=100, description="Ready prebuilds kept per owner, repository and branch; a "
        "newer one that becomes ready deletes the oldest (docs/prebuilds.md)."
    )
    prebuild_fork_ahead: bool = Field(
        True, description="Keep one fork of each ready prebuild made ahead and frozen (hidden, "
        "counted toward its owner's limits), which the owner's next matching create takes "
        "instead of forking then (docs/prebuilds.md). Needs a backend that freezes and "
        "restores memory (Docker with gVisor)."
    )

    # --- git -------------------------------------------------------------------------
    clone_timeout_s: int = Field(300, description="A clone taking longer is killed.")
    clone_max_mb: int = Field(
        2048, description="A clone growing beyond this many MiB on disk is killed."
    )
    allowed_git_schemes: list[str] = Field(
        default_factory=lambda: ["https", "ssh", "git"],
        description=(
            "Remote URL schemes users may clone from (`http`, `https`, `ssh`, `git`). "
            "`ext::`, `fd::` and other transports are always refused."
        ),
    )
    outbound_allow: list[str] = Field(
        default_factory=list,
        description=(
            "Private destinations the host may connect to for clones, pushes and forge API "
            "calls: networks in CIDR notation (`10.20.0.0/16`, `127.0.0.1`) or host names "
            "(`git.corp.example`, every address it resolves to). Everything else that is not "
            "a public address (loopback, private, link-local, CGNAT, ULA) is refused."
        ),
    )
    local_repo_roots: list[Path] = Field(
        default_factory=list,
        description=(
            "Host directories under which `file://` URLs and local paths may be cloned. "
            "Empty (the default) refuses local repositories, since they read the server's "
            "own disk."
        ),
    )

    # --- devcontainer.json ---------------------------------------------------------------
    devcontainer_build_timeout_s: float = Field(
        1800, gt=0, description=(
            "A devcontainer image build (its Dockerfile, then Den's layer) taking longer is "
            "cancelled and the workspace goes to `error`."))
    devcontainer_command_timeout_s: float = Field(
        600, gt=0, description=(
            "Deadline of each devcontainer lifecycle command (onCreateCommand, "
            "postCreateCommand, postStartCommand); one that runs longer is stopped and the "
            "workspace goes to `error`."))
    devcontainer_context_max_mb: int = Field(
        512, ge=1, description="Largest devcontainer build context sent to the engine, in MiB.")
    devcontainer_builds: Literal["auto", "on", "off"] = Field(
        "auto", description=(
            "Whether Den builds a repository's own Dockerfile (`build` in devcontainer.json). "
            "The engine runs a build's `RUN` steps on its default runtime, outside Den's "
            "sandbox: `auto` builds only when that default runtime is gVisor (`\"default-"
            "runtime\": \"runsc\"` in /etc/docker/daemon.json), `on` builds whatever it is "
            "(the repositories are trusted), `off` never. A refused build puts the workspace "
            "in `error` saying so; `image` devcontainers are not affected."))

    # --- exec and files -------------------------------------------------------------------
    exec_default_timeout_s: float = Field(
        600, description="Timeout of an exec call that names none, in seconds."
    )
    exec_max_timeout_s: float = Field(3600, description="Largest timeout an exec call may ask.")
    exec_max_output_bytes: int = Field(
        16 * 1024 * 1024,
        description="stdout and stderr of one exec call are each cut at this many bytes.",
    )
    exec_concurrency: int = Field(
        64, ge=1, description="Exec calls the whole server runs at once; more wait in a queue."
    )
    exec_queue_max: int = Field(
        256,
        ge=0,
        description=(
            "Exec calls that may wait for a free slot; beyond this an exec is refused with "
            "503 `overloaded` and a Retry-After header instead of queueing forever."
        ),
    )
    file_max_bytes: int = Field(
        64 * 1024 * 1024, description="Largest file the files API reads or writes in one call."
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest request body (and WebSocket message) of every route but a file upload "
            "(`DEN_FILE_MAX_BYTES`): exec stdin and env, forms, JSON. Larger is refused with "
            "413 before it is read."
        ),
    )

    # --- forges and pull requests ------------------------------------------------------------
    forge_keys: SecretStr = Field(
        SecretStr(""),
        description=(
            "Comma-separated Fernet keys that encrypt linked forge tokens at rest: the first "
            "encrypts, all decrypt (rotation). Empty means a key generated on first start into "
            "<data_dir>/forge.key (mode 0600)."
        ),
    )
    forge_protected_branches: list[str] = Field(
        default_factory=lambda: ["main", "master", "trunk", "develop", "release/*",
                                 "production"],
        description=(
            "Branch name patterns (fnmatch) Den never pushes to from a workspace, besides the "
            "pull request's base."
        ),
    )
    forge_max_push_mb: int = Field(
        256, ge=1, description="Largest bundle of new commits one pull request call may push."
    )
    forge_git_timeout_s: int = Field(
        300, description="A host-side git fetch or push to a forge taking longer is killed."
    )
    forge_api_timeout_s: float = Field(
        30, description="Timeout of one call to a forge's REST API."
    )

    # --- API rate limits (docs/operations.md, "Rate limits") ---------------------------------
    rate_limit_per_token: float = Field(
        20.0, ge=0,
        description=(
            "Requests per second one API token (or web session) may make on average under "
            "`/api/`; beyond the burst, a 429 `rate_limited` with Retry-After. 0: no limit."
        ),
    )
    rate_limit_token_burst: int = Field(
        200, ge=1, description="Requests one token may make at once before its rate applies."
    )
    rate_limit_per_address: float = Field(
        50.0, ge=0,
        description=(
            "Requests per second one source address may make on average under `/api/` and to "
            "the login forms (`/login`, `/auth/`), whatever token they carry. 0: no limit."
        ),
    )
    rate_limit_address_burst: int = Field(
        500, ge=1, description="Requests one address may make at once before its rate applies."
    )
    rate_limit_login_per_address: float = Field(
        0.2, ge=0,
        description=(
            "Sign-in attempts per second (the login forms and OIDC callbacks) one source "
            "address may make on average; 0: no limit of its own."
        ),
    )
    rate_limit_login_burst: int = Field(
        10, ge=1, description="Sign-in attempts one address may make at once."
    )

    # --- ssh gateway ------------------------------------------------------------------
    ssh_login_timeout_s: float = Field(
        30, description="An SSH connection that has not authenticated after this long is closed."
    )
    ssh_max_preauth: int = Field(
        64,
        ge=1,
        description=(
            "SSH connections that may be authenticating at once (connected, not yet "
            "authenticated); more are closed at once until some finish."
        ),
    )
    ssh_max_preauth_per_address: int = Field(
        8,
        ge=1,
        description="The same, per source address.",
    )
    ssh_max_auth_failures: int = Field(
        10,
        description=(
            "Failed SSH connections (closed without authenticating) one source address may "
            "make within `DEN_SSH_AUTH_FAILURE_WINDOW_S`; beyond that its connections are "
            "refused until the window has passed. 0 turns the limit off."
        ),
    )
    ssh_auth_failure_window_s: float = Field(
        300, description="The window of `DEN_SSH_MAX_AUTH_FAILURES`, in seconds."
    )

    # --- web UI, sessions and OIDC login ---------------------------------------------------
    public_url: str = Field(
        "",
        description=(
            "The URL users open Den at (https://den.example.com), without a trailing slash: "
            "the base of the OIDC redirect URI and the one Origin the web terminal's "
            "WebSocket accepts. Empty means the URL of each request (fine on loopback)."
        ),
    )
    session_secret: str = Field(
        "",
        description=(
            "Key that signs the browser session cookie. Empty means a random key generated "
            "once into <data_dir>/session_secret (mode 0600)."
        ),
    )
    session_max_age_s: int = Field(
        7 * 86400, ge=60, description="A browser session ends this many seconds after login."
    )
    web_dir: str = Field(
        "",
        description=(
            "Directory with the web UI's templates/, static/ and node_modules/ (xterm.js). "
            "Empty means the web/ directory of Den's source tree."
        ),
    )
    web_token_login: bool = Field(
        True,
        description=(
            "Let users sign in to the web UI by pasting an API token (how a fresh install "
            "without OIDC is used)."
        ),
    )
    oidc_provider: str = Field(
        "oidc",
        description=(
            "Login preset: `oidc` (any OpenID Connect issuer, by discovery), `gitlab` "
            "(OpenID Connect, issuer defaults to https://gitlab.com) or `github` (OAuth)."
        ),
    )
    oidc_issuer: str = Field(
        "",
        description=(
            "Issuer URL or its discovery document URL (.../.well-known/openid-configuration). "
            "Needed for `oidc`; for `gitlab` it names a self-hosted GitLab."
        ),
    )
    oidc_client_id: str = Field(
        "", description="OAuth client id registered with the provider; empty turns OIDC off."
    )
    oidc_client_secret: str = Field("", description="OAuth client secret of that client.")
    oidc_scopes: str = Field(
        "",
        description=(
            "Scopes asked for, space-separated. Empty means the preset's: `openid email "
            "profile` (and `groups` when admin groups are set), `read:user user:email "
            "read:org` for GitHub."
        ),
    )
    oidc_display_name: str = Field(
        "", description="Name on the login button; empty means the preset's (GitHub, GitLab)."
    )
    oidc_groups_claim: str = Field(
        "groups",
        description=(
            "Claim holding the user's groups (ID token or userinfo). GitHub: the user's "
            "organisations."
        ),
    )
    oidc_admin_email_domains: list[str] = Field(
        default_factory=list,
        description=(
            "Users whose verified email is in one of these domains become admins at login "
            "(JSON list)."
        ),
    )
    oidc_admin_groups: list[str] = Field(
        default_factory=list,
        description="Users in one of these groups become admins at login (JSON list).",
    )
    oidc_registration: Literal["auto", "open", "allowlist"] = Field(
        "auto",
        description=(
            "Who gets an account at their first single sign-on: `allowlist` (only logins "
            "matching `DEN_OIDC_ALLOWED_*` or the admin policy), `open` (anyone the issuer "
            "vouches for), `auto` (`allowlist` for public issuers, GitHub, gitlab.com, "
            "Google, Microsoft, Apple, and whenever an allowlist is set; else `open`). "
            "Existing accounts always keep working."
        ),
    )
    oidc_allowed_email_domains: list[str] = Field(
        default_factory=list,
        description="A login with a verified email in one of these domains may get an "
                    "account (JSON list).",
    )
    oidc_allowed_users: list[str] = Field(
        default_factory=list,
        description="Logins that may get an account: provider user names (GitHub login, "
                    "`preferred_username`) or verified emails (JSON list).",
    )
    oidc_allowed_groups: list[str] = Field(
        default_factory=list,
        description="A login in one of these groups may get an account: GitHub "
                    "organisations, GitLab groups, the OIDC groups claim (JSON list).",
    )

    @field_validator("network_allow", "network_user_allow")
    @classmethod
    def _network_ranges(cls, value: list[str]) -> list[str]:
        from server.errors import DenError
        from server.network.policy import parse_entry

        for entry in value:
            try:
                parse_entry(entry)
            except DenError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("network_user_domains")
    @classmethod
    def _domain_patterns(cls, value: list[str]) -> list[str]:
        from server.errors import DenError
        from server.network.ceiling import parse_pattern

        for pattern in value:
            try:
                parse_pattern(pattern)
            except DenError as exc:
                raise ValueError(exc.message) from None
        return value

    def resolved_network_name(self) -> str:
        return self.network_name or f"{self.engine_prefix}-net"

    @field_validator("metrics_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value:
            from server.metrics import split_listen

            split_listen(value)
        return value
    # --- preview URLs (docs/preview.md) -------------------------------------------------
    preview_domain: str = Field(
        "",
        description=(
            "Domain whose subdomains are preview origins, <port>--<workspace>--<owner>."
            "<domain> (wildcard DNS to Den). Empty: only the path form /preview/<workspace>/"
            "<port>/ on Den's own origin."
        ),
    )
    preview_public_sharing: bool = Field(
        False,
        description="Whether a port may be shared with anyone who has the URL (share: public).",
    )
    preview_max_connections: int = Field(
        64, ge=1,
        description="Preview connections open at once to one workspace; more get 503.",
    )
    preview_idle_timeout_s: float = Field(
        300.0, gt=0,
        description=(
            "A preview connection on which the app sends nothing for this long is closed "
            "(server-sent event streams should send a comment now and then)."
        ),
    )
    preview_max_link_ttl_s: int = Field(
        7 * 86400, ge=60, description="Longest lifetime of a signed share link, in seconds.",
    )

    @field_validator("outbound_allow")
    @classmethod
    def _outbound_entries(cls, value: list[str]) -> list[str]:
        from server.outbound import parse_entries

        parse_entries(value)  # ValueError names a malformed entry
        return value

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'den.db'}"
