#!/usr/bin/env bash
# Regenerate the Python modules for Isthmus' own protos (needs grpcio-tools, the `dev`
# extra). The output is committed: CI and users never run protoc.
#
#   proto/isthmus/ca/v1/ca.proto  ->  src/isthmus/_proto/ca/v1/ca_pb2{,_grpc}.py(i)
#
# protoc derives Python import paths from the .proto's path under -I, so each file is
# staged at isthmus/_proto/<...> in a temp dir; the generated code then imports
# `isthmus._proto.ca.v1.ca_pb2`. Only the message/service names (package
# istio.v1.auth) go on the wire, so the staged path does not affect compatibility.
set -euo pipefail
cd "$(dirname "$0")/.."

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
well_known=$(python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

mkdir -p "$stage/isthmus/_proto/ca/v1" "$stage/isthmus/_proto/workload/v1"
cp proto/isthmus/ca/v1/ca.proto "$stage/isthmus/_proto/ca/v1/ca.proto"
cp proto/isthmus/workload/v1/*.proto "$stage/isthmus/_proto/workload/v1/"

python -m grpc_tools.protoc -I "$stage" -I "$well_known" \
  --python_out=src --pyi_out=src --grpc_python_out=src \
  "$stage/isthmus/_proto/ca/v1/ca.proto"
python -m grpc_tools.protoc -I "$stage" -I "$well_known" \
  --python_out=src --pyi_out=src \
  "$stage"/isthmus/_proto/workload/v1/*.proto

# Package markers, and keep linters off generated code.
for d in src/isthmus/_proto src/isthmus/_proto/ca src/isthmus/_proto/ca/v1 src/isthmus/_proto/workload src/isthmus/_proto/workload/v1; do
  [ -f "$d/__init__.py" ] || echo '"""Generated protobuf modules (scripts/gen_protos.sh); do not edit."""' > "$d/__init__.py"
done
# The gencode pins the protobuf runtime to protoc's version (ValidateProtobufRuntimeVersion);
# the builder API it uses exists since protobuf 3.20, and pyproject allows protobuf>=4.25,
# so drop the pin. Isthmus does not import ca_pb2_grpc at run time (it would pin grpcio to
# grpcio-tools' version); isthmus.controlplane.ca.service declares the method itself.
python - <<'PY'
import glob, re
for p in ["src/isthmus/_proto/ca/v1/ca_pb2.py", *glob.glob("src/isthmus/_proto/workload/v1/*_pb2.py")]:
    s = open(p).read()
    s = re.sub(r"from google.protobuf import runtime_version as _runtime_version\n", "", s)
    s = re.sub(r"_runtime_version.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", s)
    open(p, "w").write(s)
PY
for f in src/isthmus/_proto/ca/v1/ca_pb2.py src/isthmus/_proto/ca/v1/ca_pb2_grpc.py src/isthmus/_proto/workload/v1/*_pb2.py; do
  { echo '# ruff: noqa'; echo '# mypy: ignore-errors'; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
{ echo '# ruff: noqa'; cat src/isthmus/_proto/ca/v1/ca_pb2.pyi; } > src/isthmus/_proto/ca/v1/ca_pb2.pyi.tmp && mv src/isthmus/_proto/ca/v1/ca_pb2.pyi.tmp src/isthmus/_proto/ca/v1/ca_pb2.pyi
echo "generated: $(ls src/isthmus/_proto/ca/v1)"
