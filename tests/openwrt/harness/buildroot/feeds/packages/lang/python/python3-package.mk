# Stand-in for the packages feed's lang/python/python3-package.mk (see README.md).
PYTHON3_PKG_DIR := /usr/lib/python3.11/site-packages

define Py3Build/Compile
	$(INSTALL_DIR) $(PKG_INSTALL_DIR)/usr/bin $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_BUILD_DIR)/offloader $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/
	printf '#!/usr/bin/env python3\nfrom offloader.cli import main\nmain()\n' \
		>$(PKG_INSTALL_DIR)/usr/bin/ebpf-offloader
endef

Build/Compile = $(Py3Build/Compile)

define Py3Package
  ifndef Package/$(1)/install
    define Package/$(1)/install
	$$(call Py3Package/$(1)/install,$$(1))
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
    endef
  endif
endef
