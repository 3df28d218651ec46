#!/usr/bin/env bash
# The cellgate demo: a real dockerd, a cellgate network, two containers talking through
# our eBPF programs, then everything it made is removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
CG=.venv/bin/cellgate
RUN=/run/cellgate-demo
IMAGE=cellgate-demo/busybox:latest
NET=cgdemo
mkdir -p "$RUN"

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

VIPS=10.96.77.0/24 VIP=10.96.77.10
started_dockerd="" started_agent="" added_blackhole=""
cleanup() {
  set +e
  say "Cleaning up"
  $CG policy delete --labels name=l4-backend-80 >/dev/null 2>&1
  $CG policy delete --labels name=l7-public-get >/dev/null 2>&1
  $CG service delete cgdemo-web >/dev/null 2>&1
  docker rm -f cgdemo-a cgdemo-b cgdemo-c cgdemo-w cgdemo-s1 cgdemo-s2 >/dev/null 2>&1
  [ -z "$added_blackhole" ] || ip route del blackhole "$VIPS" 2>/dev/null
  docker network rm "$NET" >/dev/null 2>&1
  docker rmi "$IMAGE" >/dev/null 2>&1
  if [ -n "$started_agent" ]; then
    kill "$started_agent" 2>/dev/null; wait "$started_agent" 2>/dev/null
    $CG cleanup >/dev/null   # the agent was ours: remove its pins, state and iptables chains too
  fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$RUN"
  echo "done."
}
trap cleanup EXIT

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.2
  done
}

say "Docker"
if docker info >/dev/null 2>&1; then
  echo "using the running dockerd"
else
  echo "no dockerd running: starting one (it will be stopped at the end)"
  dockerd >"$RUN/dockerd.log" 2>&1 &
  started_dockerd=$!
  wait_for 60 docker info
fi

say "cellgate agent"
if $CG status >/dev/null 2>&1; then
  echo "using the running agent"
else
  METRICS_PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  $CG agent --http-serve-addr "127.0.0.1:$METRICS_PORT" >"$RUN/agent.log" 2>&1 &
  started_agent=$!
  wait_for 30 $CG status || { cat "$RUN/agent.log"; exit 1; }
  grep -E "built|ready" "$RUN/agent.log" | sed 's/^/  /'
fi

say "Test image (no registry here: imported from Debian's busybox-static)"
root="$RUN/rootfs"; mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
tar -C "$root" -c . | docker import -c 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
echo "imported $IMAGE"

say "A cellgate network"
show docker network create -d cellgate --ipam-driver cellgate "$NET"
show docker network inspect -f '{{range .IPAM.Config}}subnet {{.Subnet}} gateway {{.Gateway}}{{end}}' "$NET"

say "Two containers"
show docker run -d --name cgdemo-a --network "$NET" -l app=frontend "$IMAGE" sleep 3600
show docker run -d --name cgdemo-b --network "$NET" -l app=backend "$IMAGE" \
  sh -c 'for p in 80 8080; do (while true; do echo "hello from $(hostname) on $p" | nc -l -p $p; done) & done; wait'
A=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" cgdemo-a)
B=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" cgdemo-b)
echo "cgdemo-a is $A, cgdemo-b is $B"
show docker exec cgdemo-a ip route

say "Container to container (redirected by eBPF straight into the peer's namespace)"
show docker exec cgdemo-a ping -c 3 -W 1 "$B"
wait_for 10 sh -c "docker exec cgdemo-a nc -w 1 $B 8080 | grep -q hello"
show docker exec cgdemo-a nc -w 2 "$B" 8080

say "Host to container"
show ping -c 2 -W 1 "$B"
show nc -w 2 "$B" 8080 </dev/null

say "Identity policy: the backend accepts TCP/80 from the frontend only"
show docker run -d --name cgdemo-c --network "$NET" -l app=other "$IMAGE" sleep 3600
wait_for 10 sh -c "$CG endpoint list | grep -q app=other"
show cat examples/policies/l4.yaml
show $CG policy import examples/policies/l4.yaml
printf '$ docker exec cgdemo-a nc -w 2 %s 80     # frontend -> backend:80\n' "$B"
docker exec cgdemo-a nc -w 2 "$B" 80 || echo "(no answer)"
printf '$ docker exec cgdemo-c nc -w 1 %s 80     # other -> backend:80\n' "$B"
$CG monitor --type drop --count 1 --timeout 10 2>/dev/null &
mon=$!
wait_for 10 sh -c "$CG status -o json | grep -q '\"subscribers\": [1-9]'"
docker exec cgdemo-c nc -w 1 "$B" 80 || echo "(no answer: dropped by policy, as the monitor shows)"
wait "$mon" || true
show $CG policy trace --src app=other --dst app=backend --dport 80/tcp

say "API-aware policy: the frontend may only GET /public/... (enforced by the L7 proxy)"
show $CG policy delete --labels name=l4-backend-80
show docker run -d --name cgdemo-w --network "$NET" -l app=backend "$IMAGE" \
  sh -c 'mkdir -p /www/public && echo "a public page" > /www/public/index.html && echo secret > /www/private && exec httpd -f -p 80 -h /www'
W=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" cgdemo-w)
wait_for 10 sh -c "[ \$($CG endpoint list | grep -c app=backend) -ge 2 ]"   # its labels are known
show cat examples/policies/l7-http.yaml
show $CG policy import examples/policies/l7-http.yaml
$CG monitor --type l7 --count 2 --timeout 15 2>/dev/null &
mon=$!
wait_for 10 sh -c "$CG status -o json | grep -q '\"subscribers\": [1-9]'"
show docker exec cgdemo-a wget -q -O - "http://$W/public/index.html"
printf '$ docker exec cgdemo-a wget -q -O - http://%s/private\n' "$W"
docker exec cgdemo-a wget -q -O - "http://$W/private" || echo "(refused by the proxy: 403 Access denied)"
wait "$mon" || true
show $CG policy trace --src app=frontend --dst app=backend --dport 80/tcp --http-method GET --http-path /private

say "A service: a VIP balanced over every container labelled app=web (cgroup socket programs)"
ip route show | grep -q "^blackhole $VIPS" || { show ip route add blackhole "$VIPS"; added_blackhole=1; }
for n in 1 2; do
  show docker run -d --name cgdemo-s$n --network "$NET" -l app=web "$IMAGE" \
    sh -c 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www'
done
show $CG service create --frontend "$VIP:80" --selector app=web --target-port 80 --name cgdemo-web
has_backends() {  # has_backends N: the service balances over N backends
  [ "$($CG service get cgdemo-web -o json | .venv/bin/python -c 'import json, sys; print(len(json.load(sys.stdin)["active_backends"]))')" = "$1" ]
}
wait_for 10 has_backends 2
show $CG service list
for i in 1 2 3 4 5 6; do
  printf '$ docker exec cgdemo-a wget -q -O - http://%s/  -> ' "$VIP"
  docker exec cgdemo-a wget -q -O - "http://$VIP/"
done
printf '$ wget -q -O - http://%s/   (from the host)  -> ' "$VIP"
wget -q -O - "http://$VIP/"
show docker rm -f cgdemo-s2
wait_for 10 has_backends 1
show $CG service get cgdemo-web

say "Flows, as Hubble shows them: every drop, the L7 requests, and allowed flows while someone follows"
show $CG observe --last 6 --verdict DROPPED
show $CG observe --type l7 --last 4 -o table
printf '$ %s observe --last 1 --type l7 -o json   (one Hubble GetFlowsResponse per line)\n' "$CG"
$CG observe --last 1 --type l7 -o json | .venv/bin/python -m json.tool
if [ -n "${METRICS_PORT:-}" ]; then
  say "Prometheus metrics with Cilium's names (opt-in listener: --http-serve-addr 127.0.0.1:$METRICS_PORT)"
  printf '$ curl -s http://127.0.0.1:%s/metrics | grep ...\n' "$METRICS_PORT"
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^(cilium_drop_count_total|cilium_endpoint |cilium_policy |hubble_http_requests_total)'
  echo "(the live service map is at http://127.0.0.1:$METRICS_PORT/map/ while the agent runs)"
fi

say "What cellgate knows"
show $CG endpoint list
show $CG identity list
show $CG status
