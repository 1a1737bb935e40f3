#!/usr/bin/env bash
# Runs inside the stand-in container (worker-image/test/standin-image.sh) for
# crates/pacloud/tests/worker_image.rs: the provisioning steps that can run
# without AL2023 and a Docker engine, then checks of what they installed.
# Mounts: /src/worker-image (read-only), /bundle with the `pacloud` binary
# (and a tiny builder-image.tar.gz + builder-image.ref), the host's docker CLI
# and socket.
# Prints `key=value` lines the test asserts on.
set -uo pipefail

# FAKE docker.service: the stand-in has no Docker (the `packages` step installs
# the real one on AL2023); the units order after it and require it.
printf '[Unit]\nDescription=stand-in for docker.service (test)\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n' \
  >/etc/systemd/system/docker.service

/src/worker-image/provision.sh --root / --bundle /bundle binary guard unit enable
echo "provision=$?"
# Idempotent: a second run changes nothing and succeeds.
/src/worker-image/provision.sh --root / --bundle /bundle binary guard unit enable >/dev/null 2>&1
echo "provision_again=$?"
/src/worker-image/provision.sh --root /tmp/elsewhere --bundle /bundle image >/dev/null 2>&1
echo "image_step_other_root=$?"
# The image step against the host's engine (its CLI and socket are mounted):
# the bundle's archive loads and its image ID (what bundle.sh records)
# resolves; a name@sha256 reference cannot resolve for a loaded archive on a
# classic-store engine, and the step says so.
if [ -f /bundle/builder-image.tar.gz ]; then
  image_out=$(/src/worker-image/provision.sh --root / --bundle /bundle image 2>&1)
  echo "image_step=$?"
  echo "config_image=$(sed -n 's/^image = //p' /etc/pacloud/pacloud.toml)"
  mkdir -p /tmp/bundle-digest
  cp /bundle/builder-image.tar.gz /tmp/bundle-digest/
  printf 'pacloud-test-builder@%s\n' "$(tr -d '[:space:]' </bundle/builder-image.ref)" >/tmp/bundle-digest/builder-image.ref
  image_out=$(/src/worker-image/provision.sh --root / --bundle /tmp/bundle-digest image 2>&1)
  echo "image_step_digest=$?"
  echo "image_step_message=$(printf '%s' "$image_out" | grep -m1 'does not resolve' || printf '%s' "$image_out" | tail -n1)"
fi
/src/worker-image/provision.sh --root / frobnicate >/dev/null 2>&1
echo "unknown_step=$?"

systemd-analyze verify /etc/systemd/system/pacloud-worker.service /etc/systemd/system/pacloud-imds-guard.service
echo "verify=$?"
# The same check on a broken copy must fail (the verifier is not vacuous).
sed 's#^ExecStart=.*#ExecStart=/usr/local/bin/no-such-pacloud worker#' /etc/systemd/system/pacloud-worker.service \
  >/etc/systemd/system/pacloud-broken.service
systemd-analyze verify /etc/systemd/system/pacloud-broken.service >/dev/null 2>&1
echo "verify_broken=$?"
rm -f /etc/systemd/system/pacloud-broken.service

for link in multi-user.target.wants/pacloud-worker.service docker.service.wants/pacloud-imds-guard.service; do
  echo "enabled_${link%%.*}=$(readlink "/etc/systemd/system/$link")"
done
echo "guard_mode=$(stat -c %a /usr/local/libexec/pacloud/imds-guard)"
echo "binary_version=$(/usr/local/bin/pacloud --version)"
echo "config_backend=$(sed -n 's/^backend = //p' /etc/pacloud/pacloud.toml)"

# The unit's own start command and environment, the way systemd runs them:
# Environment= lines, then the (optional) EnvironmentFile, then ExecStart.
unit=/etc/systemd/system/pacloud-worker.service
mapfile -t unit_env < <(sed -n 's/^Environment=//p' "$unit")
env_file=$(sed -n 's/^EnvironmentFile=-//p' "$unit")
read -r -a exec_start <<<"$(sed -n 's/^ExecStart=//p' "$unit")"
start() { # $1 = label; the env file's contents come on stdin
  mkdir -p "$(dirname "$env_file")"
  cat >"$env_file"
  mapfile -t file_env < <(grep -E '^[A-Z_]+=' "$env_file")
  out=$(env -i PATH=/usr/bin:/bin "${unit_env[@]}" "${file_env[@]}" timeout 20 "${exec_start[@]}" 2>&1)
  echo "${1}_status=$?"
  echo "${1}_message=$(printf '%s' "$out" | grep -m1 -E '^(pacloud: |Error: )' || printf '%s' "$out" | tail -n1)"
}
start none </dev/null
printf 'PACLOUD_AWS_TABLE=builds\n' | start table_only
printf 'PACLOUD_AWS_TABLE=builds\nPACLOUD_AWS_QUEUE_URL=http://127.0.0.1:9/q\n' | start no_bucket
env_queue_table_bucket() {
  printf '%s\n' PACLOUD_AWS_TABLE=builds PACLOUD_AWS_QUEUE_URL=http://127.0.0.1:9/q PACLOUD_AWS_BUCKET=b \
    PACLOUD_AWS_ENDPOINT_URL=http://127.0.0.1:9 PACLOUD_AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
}
# No signing key (and signing not turned off): the worker refuses to start
# rather than publish unsigned packages. The later cases carry a key id.
env_queue_table_bucket | start no_signing_key
env_all() {
  env_queue_table_bucket
  printf '%s\n' PACLOUD_AWS_SIGNING_KEY_ID=alias/pacloud-test
}
# Everything set and the image step's builder image (an empty rootfs) in
# pacloud.toml: the worker refuses because that image has no portage.
env_all | start no_portage
sed -i '/^image = /d' /etc/pacloud/pacloud.toml
# Queue, table and bucket set, no builder image in pacloud.toml: the worker
# must refuse before any build (the test mounts the host's docker CLI and
# socket so the docker backend's engine check passes and the image check is
# the one that speaks). The endpoint is a closed local port.
env_all | start no_image
