# Stand-in for OpenWrt's include/bpf.mk (see README.md).
BPF_DEPENDS := @HAS_BPF_TOOLCHAIN

define CompileBPF
	test -f $(1)
	echo "CompileBPF $(1) $(2)" >>$(BUILD_DIR)/compile.log
	cp $(1) $(patsubst %.c,%.o,$(1))
endef
