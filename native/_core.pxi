# Included by _core.pyx: the C declarations it needs (kept apart from the logic).
# Python.h (pyconfig.h) defines _GNU_SOURCE first, so recvmmsg/sendmmsg are declared.



cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        unsigned short sa_family

    struct sockaddr_storage:
        unsigned short ss_family

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr* CMSG_FIRSTHDR(msghdr* msg)
    cmsghdr* CMSG_NXTHDR(msghdr* msg, cmsghdr* cmsg)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
    ssize_t recvmsg(int fd, msghdr* msg, int flags)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t length)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)

    enum:
        AF_INET
        AF_INET6
        SOL_SOCKET
        MSG_DONTWAIT
        MSG_ERRQUEUE
        MSG_TRUNC
        SO_TIMESTAMPNS
        SO_TIMESTAMPING
        SCM_TIMESTAMPNS
        SCM_TIMESTAMPING


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        in6_addr sin6_addr

    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IPPROTO_TCP
        IP_RECVERR
        IPV6_RECVERR


cdef extern from "<netinet/tcp.h>" nogil:
    struct tcp_info:
        uint32_t tcpi_rtt
        uint32_t tcpi_rttvar

    enum:
        TCP_INFO


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        UDP_SEGMENT  # UDP GSO: one send, the kernel cuts equal-sized datagrams
    enum:
        SOL_UDP


cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)


# linux/errqueue.h and linux/net_tstamp.h clash with glibc's headers; these values are
# the kernel's stable UAPI.
cdef extern from *:
    """
    struct detnet_extended_err {
        uint32_t ee_errno;
        uint8_t ee_origin;
        uint8_t ee_type;
        uint8_t ee_code;
        uint8_t ee_pad;
        uint32_t ee_info;
        uint32_t ee_data;
    };
    #define DETNET_SOF_TX_HARDWARE (1 << 0)
    #define DETNET_SOF_TX_SOFTWARE (1 << 1)
    #define DETNET_SOF_RX_SOFTWARE (1 << 3)
    #define DETNET_SOF_SOFTWARE (1 << 4)
    #define DETNET_SOF_OPT_ID (1 << 7)
    #define DETNET_SOF_OPT_TSONLY (1 << 11)
    #define DETNET_SO_EE_ORIGIN_TIMESTAMPING 4
    #define DETNET_SCM_TSTAMP_SND 0
    """
    struct detnet_extended_err:
        uint32_t ee_errno
        uint8_t ee_origin
        uint32_t ee_info
        uint32_t ee_data

    enum:
        DETNET_SOF_TX_HARDWARE
        DETNET_SOF_TX_SOFTWARE
        DETNET_SOF_RX_SOFTWARE
        DETNET_SOF_SOFTWARE
        DETNET_SOF_OPT_ID
        DETNET_SOF_OPT_TSONLY
        DETNET_SO_EE_ORIGIN_TIMESTAMPING
        DETNET_SCM_TSTAMP_SND


cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        int fd
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)

    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLLIN


cdef extern from "<unistd.h>" nogil:
    int close(int fd)


# Records written straight into the numpy arrays (SENT_DTYPE / REPLY_DTYPE, unaligned).
cdef packed struct sent_rec:
    uint64_t seq
    int64_t user_tx_ns
    int64_t kernel_tx_ns
    int64_t hw_tx_ns


cdef packed struct reply_rec:
    uint64_t seq
    uint32_t session
    uint32_t size
    int64_t tx_ns
    int64_t refl_rx_ns
    int64_t refl_tx_ns
    int64_t kernel_rx_ns
    int64_t user_rx_ns
    uint8_t source
    uint8_t kind
    uint8_t refl_source
    uint8_t followup_source
    uint64_t followup_seq
    int64_t refl_tx_kernel_ns
    int64_t hw_rx_ns


# A decoded header (host byte order); the stamp fields only of version-2 packets.
cdef struct header_t:
    uint32_t magic
    uint8_t version
    uint8_t flags
    uint16_t length
    uint32_t session
    uint32_t reserved
    uint64_t seq
    uint64_t tx_ns
    uint64_t refl_rx_ns
    uint64_t refl_tx_ns
    uint8_t rx_source
    uint8_t followup_source
    uint64_t followup_seq
    uint64_t followup_tx_ns


# A late kernel TX stamp waiting for take_tx_stamps().
cdef struct late_t:
    uint64_t seq
    int64_t sw
    int64_t hw


# The reflector's two-step state: per session a ring of replies whose kernel TX stamp has
# not been delivered yet (PER_SESSION of them), in a fixed open-addressing table.
cdef struct pending_t:
    uint64_t seq
    int64_t due
    int64_t pre_tx
    int64_t stamp
    uint32_t key
    uint8_t keyed
    uint8_t source


cdef struct session_t:
    uint8_t used
    uint32_t namelen
    uint32_t session
    int64_t last_ns
    uint32_t head
    uint32_t count
    sockaddr_storage name
    pending_t ring[64]
