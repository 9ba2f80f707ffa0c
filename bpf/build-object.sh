#!/bin/sh
# Compiles one bpf/*.bpf.c program for the BPF target and embeds the object in BPFSteer
# as a base64 literal in enum NAME. Run by the BPFObject build plugin on every package
# build; nothing compiled is committed.
#   build-object.sh SOURCE OUTPUT.swift WORKDIR NAME
set -eu
source=$1 output=$2 workdir=$3 name=$4
object="$workdir/$(basename "$source" .c).o"
mkdir -p "$workdir"

# Kernel types (struct xdp_md, iphdr, ...) come from the running kernel's BTF.
if [ ! -s "$workdir/vmlinux.h" ]; then
  if ! command -v bpftool >/dev/null 2>&1; then
    echo "error: bpftool is needed to build bpf/ (run scripts/bootstrap)" >&2; exit 1
  fi
  if [ ! -r /sys/kernel/btf/vmlinux ]; then
    echo "error: /sys/kernel/btf/vmlinux is missing: the kernel has no BTF" >&2; exit 1
  fi
  bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$workdir/vmlinux.h.$$"
  mv "$workdir/vmlinux.h.$$" "$workdir/vmlinux.h"
fi

clang=${CLANG:-$(command -v clang)}
arch=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
"$clang" -target bpf -D__TARGET_ARCH_"$arch" -O2 -g -mcpu=v3 -Wall -Werror \
  -I"$workdir" -I"$(dirname "$source")" -c "$source" -o "$object"

{
  echo "// Generated from bpf/$(basename "$source") by bpf/build-object.sh. Do not edit."
  echo "enum $name {"
  printf '    static let base64 = "'
  base64 -w0 "$object"
  echo '"'
  echo "}"
} > "$output.tmp"
mv "$output.tmp" "$output"
