# shellcheck shell=sh
# Helpers shared by /init and /tests/*.sh in the ssi-vmm initramfs (POSIX sh / busybox ash).

# ssi_param NAME: print the value of the last NAME=VALUE word on the kernel command line
# (raw, see ssi_decode); return 1 if there is none.
ssi_param() {
  _sp_found=1
  _sp_val=
  read -r _sp_cl < /proc/cmdline || true
  set -f
  # shellcheck disable=SC2086  # word splitting of the command line is intended
  for _sp_arg in $_sp_cl; do
    case $_sp_arg in
      "$1="*) _sp_val=${_sp_arg#"$1="}; _sp_found=0 ;;
    esac
  done
  set +f
  [ "$_sp_found" -eq 0 ] && printf '%s\n' "$_sp_val"
  return "$_sp_found"
}

# ssi_decode STRING: undo the command-line encoding of ssi.cmd / ssi.token values:
# "+" -> space, "%2B" -> "+", "%25" -> "%".
ssi_decode() {
  printf '%s\n' "$1" | sed -e 's/+/ /g' -e 's/%2[Bb]/+/g' -e 's/%25/%/g'
}

# ssi_module_params MODULE: the "MODULE.param=value" words of the kernel command line, as
# "param=value" words for insmod ("-" and "_" in the module name are equivalent, as in the
# kernel). insmod does not look at the kernel command line itself.
ssi_module_params() {
  _mp_want=$(printf '%s' "$1" | tr - _)
  read -r _mp_cl < /proc/cmdline || true
  _mp_out=
  set -f
  # shellcheck disable=SC2086
  for _mp_arg in $_mp_cl; do
    _mp_lhs=${_mp_arg%%=*}
    case $_mp_lhs in *.*) ;; *) continue ;; esac   # not MODULE.param[=value]
    _mp_mod=$(printf '%s' "${_mp_lhs%%.*}" | tr - _)
    [ "$_mp_mod" = "$_mp_want" ] && _mp_out="$_mp_out ${_mp_arg#*.}"
  done
  set +f
  printf '%s\n' "${_mp_out# }"
}

# ssi_poweroff: flush and power the machine off (never returns).
ssi_poweroff() {
  sync
  poweroff -f
  sleep 5
  echo "SSI-VMM-POWEROFF-FAILED"
  while :; do sleep 3600; done
}
