#!/usr/bin/env bash
# steer on a real Kubernetes cluster (kind): builds the images, installs steer with
# `kubectl apply -k deploy/`, deploys the seed's food-delivery example, and checks the same
# paths as the node test bed (tests/tests/full_stack.rs), plus every CanaryRelease Accepted.
#
# Needs docker (with a running engine), kind and kubectl, and a machine that can pull the base
# images: not the CI machines of this repository (no Docker engine, no registry). Run it on a
# workstation or a CI runner with Docker. KEEP_CLUSTER=1 leaves the cluster up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=steer-e2e
fail() { echo "kind-e2e: $*" >&2; exit 1; }

command -v docker >/dev/null || fail "docker is not installed"
command -v kind >/dev/null || fail "kind is not installed (https://kind.sigs.k8s.io)"
command -v kubectl >/dev/null || fail "kubectl is not installed"
command -v python3 >/dev/null || fail "python3 is not installed (it reads the demo service's answers)"
docker info >/dev/null 2>&1 || fail "the Docker engine is not reachable (docker info failed)"

cleanup() {
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

docker build -f deploy/Dockerfile --target steer -t steer:dev .
docker build -f deploy/Dockerfile --target demo -t steer-demo:dev .
kind create cluster --config deploy/kind/cluster.yaml --wait 120s
kind load docker-image --name "$CLUSTER" steer:dev steer-demo:dev

kubectl apply -k deploy/
kubectl -n steer-system rollout status daemonset/steer --timeout=180s
kubectl wait --for=condition=Established crd/canaryreleases.steer.dev --timeout=60s
kubectl apply -f deploy/examples/k8s/food-delivery.yaml
kubectl -n food wait --for=condition=Available deployment --all --timeout=180s

# Requests enter through the steer gateway of a worker node.
NODE="$CLUSTER-worker"
NODE_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$NODE")

# path HEADERS...: the versions a request took, e.g. `order/v1 -> restaurant/v2-red -> delivery/v1 @ food/red`.
path() {
  local args=()
  for header in "$@"; do args+=(-H "$header"); done
  docker exec "$NODE" curl -s --max-time 10 -H 'Host: order.food' ${args[@]+"${args[@]}"} "http://$NODE_IP:15080/" |
    python3 -c '
import json, sys
hop = json.load(sys.stdin)
hops, todo = [], [hop]
while todo:
    h = todo.pop(0)
    hops.append(h)
    todo[0:0] = h.get("calls", [])
releases = {h.get("release") for h in hops}
errors = [h for h in hops if h.get("error")]
assert not errors, f"a hop failed: {errors}"
assert len(releases) == 1, f"one release per request, on every hop: {hops}"
print(" -> ".join(h["service"] + "/" + h["version"] for h in hops), "@", releases.pop())'
}

expect() {
  local want=$1; shift
  local got=""
  # The agents apply what they watch within moments; give a fresh install a little time.
  for _ in $(seq 1 30); do
    got=$(path "$@" 2>&1 || true)
    [[ "$got" == "$want" ]] && { echo "ok   ${*:-(no tags)} -> $got"; return; }
    sleep 2
  done
  fail "${*:-(no tags)} took '$got', expected '$want'"
}

expect "order/v1 -> restaurant/v1 -> delivery/v2-green @ food/green" "x-region: atlantis"
expect "order/v1 -> restaurant/v2-blue -> delivery/v2-blue @ food/blue" "x-device: android"
expect "order/v1 -> restaurant/v2-red -> delivery/v1 @ food/red" "x-device: android" "x-region: atlantis"
expect "order/v1 -> restaurant/v1 -> delivery/v1 @ None"
expect "order/v1 -> restaurant/v1 -> delivery/v1 @ None" "x-device: iphone"
expect "order/v1 -> restaurant/v1 -> delivery/v2-green @ food/green" "x-device: iphone" "x-region: atlantis"
# A forged stamp from outside has no effect at the gateway.
expect "order/v1 -> restaurant/v1 -> delivery/v1 @ None" "x-steer-release: food/red"

# One agent (the Lease holder) writes status; give it a moment after a fresh install.
for release in red blue green; do
  state=""
  for _ in $(seq 1 30); do
    state=$(kubectl -n food get canaryrelease "$release" -o jsonpath='{.status.state}')
    [[ "$state" == Accepted ]] && break
    sleep 2
  done
  [[ "$state" == Accepted ]] || fail "CanaryRelease $release is '$state', expected Accepted"
done
kubectl -n food get canaryreleases
echo "kind-e2e: every path as on the node test bed"
