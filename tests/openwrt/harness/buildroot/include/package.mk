# Stand-in for OpenWrt's include/package.mk (see README.md).
PKG_BUILD_DIR ?= $(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR ?= $(PKG_BUILD_DIR)/ipkg-install

# prepare, compile and install (into $(DESTDIR)) the package, like the
# buildroot's prepare/compile/ipkg steps.
define BuildPackage
prepare:
	$$(Build/Prepare)
compile: prepare
	$$(Build/Compile)
install: compile
	$$(call Package/$(1)/install,$$(DESTDIR))
endef
