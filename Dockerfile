# The cellgate agent image, built with no image registry: `make image` (plugin/managed/build.sh).
# The build context it prepares holds rootfs.tar, a Debian bookworm rootfs made by mmdebstrap from
# Debian's packages (python3, python3-bpfcc, iproute2, iptables, kmod, bpftool) with the agent's
# Python dependencies in the venv /opt/cellgate (cached under /var/cache/cellgate, keyed by a hash
# of the package list), and cellgate's wheel, installed as the last, quick layer.
#
# Run it privileged (or with the --cap-add list of docs/packaging.md) in the host network namespace:
#   docker run -d --name cellgate --privileged --network host \
#     -v /sys/fs/bpf:/sys/fs/bpf -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -v /var/lib/cellgate:/var/lib/cellgate -v /run/docker/plugins:/run/docker/plugins \
#     -v /var/run/cellgate:/var/run/cellgate -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/run/netns:/var/run/netns:rshared cellgate:0.1.0
FROM scratch
ADD rootfs.tar /
COPY cellgate-*.whl /tmp/
RUN /opt/cellgate/bin/pip install -q --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        /tmp/cellgate-*.whl && rm /tmp/cellgate-*.whl && /opt/cellgate/bin/cellgate --help >/dev/null
ENV PATH=/opt/cellgate/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CELLGATE_CNI_BIN_DIR=""
ENTRYPOINT ["/opt/cellgate/bin/cellgate"]
CMD ["agent"]
