# A stand-in for OpenWrt's shell library, for running init scripts on Debian.
#
# OpenWrt's /etc/rc.common, /lib/functions.sh (config_load, config_get, ...)
# and /lib/functions/procd.sh (procd_*) do not exist on a Debian test machine,
# and the real procd ones talk to procd over ubus. This file provides the same
# functions with the same arguments and semantics for what our scripts use, and
# records every call, one per line, fields separated by tabs, in $CALLS.
#
# Usage: sh rc-common.sh INITSCRIPT ACTION [ARGS...]
#   CALLS    file the calls are appended to
#   UCI_DIR  folder of uci files that config_load reads (/etc/config stand-in)
#   RUNNING  1: procd_running reports the service's instance as running
#
# config_load works like the real one: uci syntax is shell syntax once
# `config`, `option` and `list` are functions, so the file is sourced.
# shellcheck disable=SC3043,SC2034,SC2119,SC2120

record() {
	local IFS='	'
	printf '%s\n' "$*" >>"$CALLS"
}

# ---- /lib/functions.sh -------------------------------------------------------

CONFIG_SECTIONS=""
CONFIG_NUM_SECTIONS=0
CONFIG_SECTION=""

config() {
	local type="$1"
	local name="$2"

	CONFIG_NUM_SECTIONS=$((CONFIG_NUM_SECTIONS + 1))
	[ -n "$name" ] || name="cfg$CONFIG_NUM_SECTIONS"
	CONFIG_SECTION="$name"
	CONFIG_SECTIONS="$CONFIG_SECTIONS $name"
	eval "CONFIG_${name}_TYPE=\$type"
}

option() {
	local name="$1"
	local value="$2"

	eval "CONFIG_${CONFIG_SECTION}_${name}=\$value"
}

list() {
	local name="$1"
	local value="$2"
	local old

	eval "old=\${CONFIG_${CONFIG_SECTION}_${name}:-}"
	eval "CONFIG_${CONFIG_SECTION}_${name}=\"\${old:+\$old }\$value\""
}

package() {
	:
}

config_load() {
	record config_load "$@"
	[ -f "$UCI_DIR/$1" ] || return 1
	# shellcheck disable=SC1090
	. "$UCI_DIR/$1"
}

config_foreach() {
	local function="$1"
	local type="$2"
	local section
	local section_type
	shift 2

	for section in $CONFIG_SECTIONS; do
		eval "section_type=\$CONFIG_${section}_TYPE"
		[ "$section_type" = "$type" ] || continue
		"$function" "$section" "$@"
	done
}

config_get() {
	eval "$1=\${CONFIG_${2}_${3}:-\${4:-}}"
}

config_get_bool() {
	local _value

	eval "_value=\${CONFIG_${2}_${3}:-\${4:-}}"
	case "$_value" in
	1 | on | true | yes | enabled) _value=1 ;;
	0 | off | false | no | disabled) _value=0 ;;
	*) _value="${4:-}" ;;
	esac
	eval "$1=\$_value"
}

# ---- /lib/functions/procd.sh -------------------------------------------------

procd_open_service() { record procd_open_service "$@"; }
procd_open_instance() { record procd_open_instance "$@"; }
procd_set_param() { record procd_set_param "$@"; }
procd_append_param() { record procd_append_param "$@"; }
procd_close_instance() { record procd_close_instance "$@"; }
procd_add_reload_trigger() { record procd_add_reload_trigger "$@"; }
procd_add_raw_trigger() { record procd_add_raw_trigger "$@"; }
procd_add_interface_trigger() { record procd_add_interface_trigger "$@"; }
procd_add_reload_interface_trigger() { record procd_add_reload_interface_trigger "$@"; }
procd_send_signal() { record procd_send_signal "$@"; }
procd_kill() { record procd_kill "$@"; }

# The real one calls service_triggers while the message is built.
procd_close_service() {
	if type service_triggers >/dev/null 2>&1; then
		service_triggers
	fi
	record procd_close_service "$@"
}

procd_running() {
	record procd_running "$@"
	[ "${RUNNING:-0}" = 1 ]
}

logger() { record logger "$@"; }

# ---- /etc/rc.common (the procd part) -----------------------------------------

initscript="$1"
action="$2"
shift 2
name="$(basename "$initscript")"

start() {
	local ret

	procd_open_service "$name" "$initscript"
	start_service "$@"
	ret=$?
	procd_close_service
	return $ret
}

stop() {
	if type stop_service >/dev/null 2>&1; then
		stop_service "$@"
	fi
	procd_kill "$name" "$@"
}

reload() {
	if type reload_service >/dev/null 2>&1; then
		reload_service "$@"
	else
		start
	fi
}

restart() {
	stop
	start "$@"
}

boot() {
	start "$@"
}

# shellcheck disable=SC1090
. "$initscript"

case " start stop reload restart boot $EXTRA_COMMANDS " in
*" $action "*) "$action" "$@" ;;
*)
	echo "unknown action $action" >&2
	exit 64
	;;
esac
