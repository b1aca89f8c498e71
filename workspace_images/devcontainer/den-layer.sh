#!/bin/sh
# Den's layer on top of a devcontainer's image (server/devcontainer/build.py): what every
# workspace needs whatever its image is. Run as root during the layer's build, with no network.
#   - user dev (uid 1000 where free), who runs Den's sessions, with /home/dev
#   - den-init (started by the agent as the image's init: sudo broker, tmux server)
#   - sudo through den-sudo (gVisor ignores set-user-ID bits), when the image has python3
#   - the tmux wrapper, when the image has tmux
#   - /workspace owned by dev
# An image without a POSIX shell or useradd cannot take the layer: the build fails with the
# message below, and the workspace goes to error with it.
set -eu
L=/usr/local/lib/den/layer
fail() { echo "den: $*" >&2; exit 3; }

command -v useradd >/dev/null 2>&1 || fail "this image has no useradd (package passwd): Den needs it to add its user dev; use a Debian- or Ubuntu-based image"
# dev is uid and gid 1000, the owner Den gives the repository's files: when the image already
# has a user 1000 (vscode, node), dev shares its uid (and so its files).
if ! id dev >/dev/null 2>&1; then
    getent group 1000 >/dev/null 2>&1 || groupadd --gid 1000 dev
    shell=/bin/sh
    [ -x /bin/bash ] && shell=/bin/bash
    useradd --non-unique --uid 1000 --gid 1000 --create-home --home-dir /home/dev \
        --shell "$shell" dev
fi
[ "$(id -u dev)" = 1000 ] || echo "den: user dev is uid $(id -u dev), not 1000: the repository's files (uid 1000) are not dev's"
install -d -o dev -g 1000 -m 0755 /home/dev /workspace

install -d -m 0755 /usr/local/bin /usr/local/lib/den /etc/den
install -m 0755 $L/den-init /usr/local/bin/den-init
# The broker knows its callers by uid: the name of uid 1000 may be the image's user, not dev.
for name in dev "$(getent passwd 1000 | cut -d: -f1)"; do
    grep -qx "$name" /etc/den/sudoers 2>/dev/null || echo "$name" >> /etc/den/sudoers
done
if [ -x /usr/bin/python3 ]; then
    install -m 0755 $L/den-sudo-broker /usr/local/lib/den/den-sudo-broker
    install -m 0755 $L/den-sudo /usr/local/bin/den-sudo
    if [ -e /usr/bin/sudo ] && [ ! -L /usr/bin/sudo ]; then
        if command -v dpkg-divert >/dev/null 2>&1; then
            dpkg-divert --local --rename --divert /usr/bin/sudo.setuid --add /usr/bin/sudo
        else
            mv /usr/bin/sudo /usr/bin/sudo.setuid
        fi
    fi
    ln -sf /usr/local/bin/den-sudo /usr/bin/sudo
else
    echo "den: this image has no /usr/bin/python3: sudo is not available in its workspaces"
fi
if [ -x /usr/bin/tmux ]; then
    install -m 0755 $L/tmux-wrapper /usr/local/bin/tmux
    if [ -f $L/libden-closefix.so ]; then
        install -m 0644 $L/libden-closefix.so /usr/local/lib/den/libden-closefix.so
    fi
fi
rm -rf $L
